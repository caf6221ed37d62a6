// Hierarchical BKT, the same model as bktbayes.BKTModel() (skill logits all
// non-centred here; ordered guess/slip: 1 - slip = inv_logit(x_slip),
// guess = (1 - slip) inv_logit(x_guess), so guess + slip < 1), with the hidden
// state summed out by a scalar forward filter per (student, skill) sequence.
// Priors are bktbayes.models.DEFAULT_PRIORS. For the Stan side-by-side.
data {
  int<lower=1> K;                       // skills
  int<lower=1> S;                       // sequences
  int<lower=1> N;                       // responses
  array[S] int<lower=1, upper=K> skill;
  array[S] int<lower=1> start;          // first response of each sequence (1-based)
  array[S] int<lower=1> len;
  array[N] int<lower=0, upper=1> y;
}
parameters {
  vector[4] mu;                         // init, transit, guess, slip (logit scale)
  vector<lower=0>[4] sigma;
  matrix[4, K] z;
}
transformed parameters {
  matrix[4, K] x;
  for (g in 1:4) x[g] = mu[g] + sigma[g] * z[g];
}
model {
  mu[1] ~ normal(-0.847, 1.5);   // logit 0.3
  mu[2] ~ normal(-2.314, 1.5);   // logit 0.09
  mu[3] ~ normal(-1.253, 1.0);   // logit (0.2 / 0.9)
  mu[4] ~ normal(2.197, 1.0);    // logit 0.9
  sigma[1] ~ normal(0, 1.0);
  sigma[2] ~ normal(0, 1.0);
  sigma[3] ~ normal(0, 0.75);
  sigma[4] ~ normal(0, 0.75);
  to_vector(z) ~ std_normal();
  {
    // Per-skill probabilities once per gradient, not once per sequence.
    vector[K] pinit = inv_logit(x[1]');
    vector[K] tr = inv_logit(x[2]');
    vector[K] a1 = inv_logit(x[4]');          // P(correct | mastered) = 1 - slip
    vector[K] sl = 1 - a1;
    vector[K] g = a1 .* inv_logit(x[3]');
    vector[K] b0 = 1 - g;
    vector[K] ntr = 1 - tr;
    vector[S] lls;
    for (s in 1:S) {
      int k = skill[s];
      real p = pinit[k];
      real q = 1 - p;                         // both states carried: stable near p = 1
      real ll = 0;
      for (t in start[s]:(start[s] + len[s] - 1)) {
        real a = y[t] == 1 ? a1[k] : sl[k];
        real b = y[t] == 1 ? g[k] : b0[k];
        real pa = p * a;
        real qb = q * b;
        real lik = pa + qb;
        ll += log(lik);
        p = (pa + qb * tr[k]) / lik;
        q = qb * ntr[k] / lik;
      }
      lls[s] = ll;
    }
    target += sum(lls);
  }
}
