"""The online output-length predictor, its labelling and its evaluation.

What it predicts: the number of tokens a request will generate, as a bucket of
`bucket_width_tokens` (default 50) with lower and upper bounds and a point estimate, never
above the request's max_tokens (`shuffleinfer.scheduler.prediction.Prediction`).

How (`learned.NgramPredictor`): hashed word 1-3-grams of the last user message (head and
tail) plus prompt length, max_tokens, temperature, chat and stop flags, into a bucket
classifier and a log-length median regression, both linear and learned by AdaGrad one
request at a time; numpy only, ~0.1-0.3 ms per prediction. Until it has been fitted on
labels or has observed `min_observations` requests it predicts its prior, the running
median of finished requests.

One learner, many prediction sites (the cluster design; the Ray wiring lives in runtime/):

1. The learner is one `NgramPredictor` at the global scheduler. At start it is loaded from
   its saved state (`NgramPredictor.load`) if there is one, else fitted on a labels file
   (`fit`) if given, else it starts from the prior. The scheduler hears of every finished
   request and calls `observe(request, num_output_tokens)`: one AdaGrad step, and
   `version` goes up by one.
2. Every prefill instance holds a read-only `NgramPredictor` with the same configuration and
   calls `predict` in a worker thread beside the prefill. It never learns itself: all
   updates go through the learner, so there is one model, not one per instance drifting
   apart.
3. Versions flow learner -> instances: every N observations or T seconds the scheduler
   takes `snapshot()` (a `PredictorState`: version counter, weights copy, prior window;
   about 11 MB at the defaults) and pushes it; an instance calls `apply(state)`, which
   swaps in the new model through one reference (a prediction running meanwhile finishes
   on the old one) and ignores a state no newer than the one it holds. An instance that
   misses pushes keeps predicting with an older version: predictions are advice, never
   needed for correctness.
4. The learner saves itself (`save`, one atomic .npz with the optimiser state) every few
   minutes and on shutdown, so a restart continues learning where it stopped.
"""

from shuffleinfer.predictor.config import NgramPredictorConfig
from shuffleinfer.predictor.learned import NgramPredictor
from shuffleinfer.predictor.state import PredictorState

__all__ = ["NgramPredictor", "NgramPredictorConfig", "PredictorState"]
