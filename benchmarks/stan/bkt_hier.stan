// Hierarchical BKT, the same model as bktbayes.BKTModel() (non-centred skill
// logits, ordered guess/slip), with the hidden state summed out by a scalar
// forward filter per (student, skill) sequence. For the Stan side-by-side.
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
  vector[4] mu;
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
  mu[3] ~ normal(-1.386, 1.0);   // logit 0.2
  mu[4] ~ normal(1.95, 1.0);
  sigma[1] ~ normal(0, 1.0);
  sigma[2] ~ normal(0, 1.0);
  sigma[3] ~ normal(0, 0.75);
  sigma[4] ~ normal(0, 0.75);
  to_vector(z) ~ std_normal();
  for (s in 1:S) {
    int k = skill[s];
    real pinit = inv_logit(x[1, k]);
    real tr = inv_logit(x[2, k]);
    real g = inv_logit(x[3, k]);
    real sl = (1 - g) * inv_logit(-x[4, k]);
    real p = pinit;
    real q = 1 - pinit;
    real ll = 0;
    for (t in start[s]:(start[s] + len[s] - 1)) {
      real a = y[t] == 1 ? 1 - sl : sl;
      real b = y[t] == 1 ? g : 1 - g;
      real lik = p * a + q * b;
      real pp = p * a / lik;
      real pq = q * b / lik;
      ll += log(lik);
      p = pp + pq * tr;
      q = pq * (1 - tr);
    }
    target += ll;
  }
}
