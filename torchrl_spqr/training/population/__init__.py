"""Population training: ``K`` independent agents updated in one batched call.

A population holds ``K`` agents built exactly as ``K`` single runs would be
(each a loss module such as ``SACNLoss(actor, QEnsemble(...))``, optionally
wrapped in ``SPQRLoss``), and updates all of them with **one** vmapped call of
the single-agent loss: the agents' parameters and buffers are stacked along a
leading agent dimension (``TensorDict.stack`` of ``TensorDict.from_module``),
and :func:`torch.vmap` runs the loss over that dimension with the stacked
state swapped into one template module (``state.to_module(template)``). The
``N``-member critic ensemble inside the loss is already batched over its
members, so the ``K x N`` critics run as one batched matrix product per layer,
and the ``K`` actors likewise.

Losses checked against single runs in ``tests/training/test_population.py``:
``SACNLoss`` alone and in ``SPQRLoss``, ``ReferenceREDQLoss``, ``CQLNLoss``. A loss whose forward cannot run under
:func:`torch.vmap` (``EDACLoss``: its diversity term takes gradients inside
the loss) is refused at the first update with an error naming it.

What stays separate per agent, and why the result equals ``K`` separate runs:

- parameters, target critics, temperature (``log_alpha``), target entropy and
  the SPQR ``beta`` are rows of the stacked state (``beta`` a ``(K,)`` buffer,
  see below);
- the summed loss is ``sum_k L_k(theta_k)``, so the gradient reaching agent
  ``k``'s rows is exactly ``dL_k / dtheta_k``;
- Adam (and AdamW, with or without ``amsgrad``) is elementwise: each entry of
  ``exp_avg`` / ``exp_avg_sq`` is updated from the same entry of the gradient
  only, and the step counter is the same for every agent because they all step
  together. One optimiser over the stacked tensors therefore keeps per-agent
  Adam states exactly separate (row ``k`` of each state tensor is agent ``k``'s
  state). Anything that is *not* elementwise must be done per agent: gradient
  clipping by norm (``max_grad_norm``) is computed per agent and per parameter
  group, as ``clip_grad_norm_`` on that agent's own parameters would;
- the soft target update ``target <- target + tau (online - target)`` is
  elementwise too (one ``torch._foreach_lerp_`` over the stacked tensors);
- replay: :class:`PopulationReplayBuffer` keeps ``K`` buffers in one
  ``[K, capacity]`` storage and draws each agent's indices independently;
- environments: :class:`PopulationEnvs` steps each agent's own environment
  (in process, or in a TorchRL ``ParallelEnv`` with one worker per agent), and
  :class:`PopulationEvaluator` evaluates each agent on its own evaluation
  environment (one after another, or all at once with one batched policy call
  per step).

Random draws: ``randomness="different"`` (default, for training) gives every
agent its own policy samples; ``randomness="same"`` gives every agent the draw
a single run would see from the same generator state, so
``torch.manual_seed(s)`` + a ``"same"`` population reproduces ``K`` single runs
each started with ``torch.manual_seed(s)`` (``tests/training/test_population.py``).

Per-agent settings: initial parameters (build agent ``k`` under its own seed,
see :func:`build_population`), the SPQR ``beta`` (each agent's
``SPQRLoss(beta=...)``, read at construction into the ``(K,)`` buffer
:attr:`PopulationUpdate.beta`, which may be changed between updates; the SPQR
term is computed for every agent of an ``SPQRLoss`` population and multiplied
by its beta, so ``beta = 0`` agents get exactly zero SPQR gradient: for a
population without SPQR, pass the bare losses), ``alpha_init`` and ``target_entropy``, the batches and the replay
data. Shared (the loss's Python-level settings, which decide the control flow
of the one vmapped call, and are checked equal): the loss class and network
architecture, the ensemble size, the SPQR ``pairs`` / ``member_weights`` /
``add_to``, ``reduction``, ``fixed_alpha``, the discount ``gamma``, and the
optimiser's hyperparameters (learning rates, betas, eps) and ``tau``. A
population that mixes, e.g., ``pairs="data"`` and ``pairs="next_policy"`` is
two populations. SPQR needs ``diagnostics_interval=0`` (the diagnostics take
data-dependent branches that ``torch.vmap`` cannot batch) and no beta schedule
(set :attr:`PopulationUpdate.beta` between updates instead).

GPU path: ``compile=True`` wraps the update in :func:`torch.compile` and
``cudagraphs=True`` additionally captures it with TensorDict's
:class:`~tensordict.nn.CudaGraphModule` (as TorchRL's SOTA scripts do); CUDA
graphs need a CUDA device and are refused on CPU with a message saying so,
``cudagraphs="auto"`` captures on CUDA and stays eager (with a warning) elsewhere.
"""

from torchrl_spqr.training.population.envs import PopulationEnvs, PopulationEvaluator
from torchrl_spqr.training.population.replay import PopulationReplayBuffer
from torchrl_spqr.training.population.update import PopulationUpdate, build_population

__all__ = [
    "PopulationEnvs",
    "PopulationEvaluator",
    "PopulationReplayBuffer",
    "PopulationUpdate",
    "build_population",
]
