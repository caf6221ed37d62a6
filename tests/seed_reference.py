"""The seed card's tracer, verbatim (``../shared/seed/knowledge_tracing_service.md``).

Only the Django imports and the database function are left out; the maths is
copied character for character so that the tests compare against it, not
against a re-derivation.
"""

from dataclasses import dataclass


@dataclass
class BKTParams:
    p_init: float = 0.3  # P(L₀)
    p_transit: float = 0.09  # P(T)
    p_guess: float = 0.2  # P(G)
    p_slip: float = 0.1  # P(S)


class BayesianKnowledgeTracer:
    def __init__(self, params: BKTParams = None):
        self.params = params or BKTParams()

    def update(self, p_mastery: float, correct: bool) -> float:
        """Single Bayesian update after one observation."""
        p = self.params

        if correct:
            # P(L|correct) = P(correct|L)*P(L) / P(correct)
            p_correct_given_L = 1 - p.p_slip
            p_correct_given_notL = p.p_guess
            p_correct = p_correct_given_L * p_mastery + p_correct_given_notL * (1 - p_mastery)
            p_L_given_correct = (p_correct_given_L * p_mastery) / p_correct
        else:
            # P(L|incorrect)
            p_incorrect_given_L = p.p_slip
            p_incorrect_given_notL = 1 - p.p_guess
            p_incorrect = p_incorrect_given_L * p_mastery + p_incorrect_given_notL * (1 - p_mastery)
            p_L_given_correct = (p_incorrect_given_L * p_mastery) / p_incorrect

        # Apply learning transition
        return p_L_given_correct + (1 - p_L_given_correct) * p.p_transit

    def predict_next(self, p_mastery: float) -> float:
        """Predict probability of correct on next attempt."""
        p = self.params
        return p_mastery * (1 - p.p_slip) + (1 - p_mastery) * p.p_guess


def update_mastery_bkt_values(p_stored: float, responses):
    """The arithmetic of the seed's update_mastery_bkt without the database."""
    tracer = BayesianKnowledgeTracer()
    p = p_stored
    for correct in responses:
        p = tracer.update(p, correct)
    return min(0.99, max(0.01, p))
