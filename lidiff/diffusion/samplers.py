"""Samplers: DDPM (ancestral), DDIM, PLMS and DPM-Solver++(2M), with classifier-free guidance and inpainting.

Every sampler is a ``jax.lax.scan`` over timestep tables fixed by (num_steps, spacing, T), so the whole loop
jits; ``sampler``, ``num_steps``, ``shape``, ``parameterization`` and ``spacing`` must be static.

Model functions:
  ``model_fn(x [B, H, W, C] float32, t [B] int32, cond) -> output [B, H, W, C]`` for ``sample``, where
  ``cond`` is a pytree (or None) whose leaves have batch as the leading axis, e.g.
  ``{"context": [B, L, D], "y": [B], "concat": [B, H, W, Cc]}``. The per-sampler functions take a
  ``denoise_fn(x, t) -> output`` with conditioning (and guidance) already bound, see ``guided_model_fn``.
  The output is in ``parameterization`` ("eps", "x0" or "v"); samplers convert it to (x0, eps).

Conventions follow CompVis (LDM): DDIM/PLMS timesteps are ``arange(0, T, T // S) + 1`` and the last step
goes to ᾱ_0 (not to 1); x0 is never clipped. Random draws are reproducible from the key:
``sample`` splits ``rng`` into (x_T key, loop key); a loop key splits into (step key, blend key); step i
uses ``jax.random.split(step_key, S)[i]`` for its noise, and the inpainting blend uses
``jax.random.split(blend_key, S + 1)`` (entry 0 for the blend of x_T, entry i + 1 after step i).

Inpainting (``mask`` [B, H, W, 1] or [B, H, W, C], 1 = keep ``x0_known``): x_T is blended with
q_sample(x0_known) at the first timestep, and after every step
``x = mask·(sqrt(a)·x0_known + sqrt(1-a)·z) + (1 - mask)·x`` with a = ᾱ at the step's target noise level,
except after the last step, where a = 1: the known region of the result equals ``x0_known`` exactly.
(CompVis blends before each step at that step's level, which is the same sequence of blends without the
final exact paste.)

DPM-Solver++ uses its own grid (``dpm_solver_timesteps``, diffusers' default "linspace") and ends at σ = 0,
i.e. it returns the clean x0 estimate; DDPM always runs all T steps.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lidiff.diffusion.process import check_parameterization, extract, model_output_to_x0_eps
from lidiff.diffusion.schedule import DiffusionSchedule

SAMPLERS = ("ddim", "ddpm", "plms", "dpm_solver++")
SPACINGS = ("uniform", "quad")

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]
ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


# ----------------------------------------------------------------------------------------------------------
# Guidance


def guided_model_fn(
    model_fn: ModelFn, guidance_scale: float | jax.Array, cond: Any, uncond: Any
) -> DenoiseFn:
    """Bind conditioning, with classifier-free guidance, into a ``denoise_fn(x, t) -> output``.

    With guidance the network runs once on a batch of 2B: x and t repeated, conditioning
    ``concat([uncond, cond])`` leaf by leaf; the output halves combine as out_u + s·(out_c - out_u).
    Guidance is applied to the output in the model's own parameterization; since x0 and eps are affine in
    the output with the same x_t-term for both halves and the weights (1 - s, s) sum to 1, this equals
    guidance on eps (and on x0) after conversion, for eps, x0 and v models alike.

    ``guidance_scale == 1`` (as a Python number) or ``uncond is None``: a single conditional call of size B.
    """
    if uncond is None or (isinstance(guidance_scale, (int, float)) and guidance_scale == 1.0):
        return lambda x, t: model_fn(x, t, cond)
    if cond is None:
        raise ValueError("classifier-free guidance needs cond when uncond is given")
    if jax.tree.structure(cond) != jax.tree.structure(uncond):
        raise ValueError(
            f"cond and uncond must have the same tree structure, got {jax.tree.structure(cond)} "
            f"and {jax.tree.structure(uncond)}"
        )

    def denoise(x: jax.Array, t: jax.Array) -> jax.Array:
        both = jax.tree.map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)
        out = model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), both)
        out_u, out_c = jnp.split(out.astype(jnp.float32), 2, axis=0)
        return out_u + guidance_scale * (out_c - out_u)

    return denoise


# ----------------------------------------------------------------------------------------------------------
# Timesteps and per-step math


def ddim_timesteps(num_steps: int, num_timesteps: int = 1000, spacing: str = "uniform") -> np.ndarray:
    """CompVis DDIM timesteps, ascending int64.

    ``"uniform"``: arange(0, T, T // S) + 1 (1, 21, ..., 981 for S = 50; 1, 6, ..., 996 for S = 200).
    Like CompVis this has ceil(T / (T // S)) entries, which is S only when S divides T (S = 400 gives 500),
    and for some S (300, 1000) it reaches t = T, which CompVis indexes out of range: refused here.
    ``"quad"``: int(linspace(0, sqrt(0.8·T), S) ** 2) + 1.
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
    if spacing == "uniform":
        steps = np.arange(0, num_timesteps, num_timesteps // num_steps)
    elif spacing == "quad":
        steps = (np.linspace(0, np.sqrt(num_timesteps * 0.8), num_steps) ** 2).astype(np.int64)
    else:
        raise ValueError(f"unknown DDIM spacing {spacing!r}; choose one of {SPACINGS}")
    steps = steps.astype(np.int64) + 1
    if steps[-1] >= num_timesteps:
        raise ValueError(
            f"{num_steps} {spacing!r} DDIM steps reach t = {steps[-1]} >= T = {num_timesteps} "
            f"(CompVis's arange(0, T, T // S) + 1); choose a step count that divides T"
        )
    return steps


def dpm_solver_timesteps(num_steps: int, num_timesteps: int = 1000) -> np.ndarray:
    """DPM-Solver timesteps, ascending int64: round(linspace(0, T-1, S+1)) without the 0.

    This is diffusers' default ("linspace") discretization: S steps from t = T-1 down to
    round((T-1)/S), then one last step to the clean end point (σ = 0).
    """
    if not 1 <= num_steps < num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps - 1}], got {num_steps}")
    return np.linspace(0, num_timesteps - 1, num_steps + 1).round().astype(np.int64)[1:]


def ddim_parameters(
    schedule: DiffusionSchedule, timesteps: np.ndarray, eta: float | jax.Array = 0.0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(alphas, alphas_prev, sigmas), each [S] float32, for ascending DDIM ``timesteps`` [S].

    alphas = ᾱ[timesteps]; alphas_prev = [ᾱ_0, ᾱ[timesteps[:-1]]] (the step from timesteps[0] goes to
    ᾱ_0); sigmas = eta·sqrt((1 - a_prev)/(1 - a)·(1 - a/a_prev)).
    """
    ac = schedule.alphas_cumprod
    alphas = ac[timesteps]
    alphas_prev = jnp.concatenate([ac[:1], ac[timesteps[:-1]]])
    sigmas = eta * jnp.sqrt((1.0 - alphas_prev) / (1.0 - alphas) * (1.0 - alphas / alphas_prev))
    return alphas, alphas_prev, sigmas


def ddim_step(
    x0: jax.Array, eps: jax.Array, alpha_prev: jax.Array, sigma: jax.Array, noise: jax.Array | None
) -> jax.Array:
    """One DDIM update: sqrt(a_prev)·x0 + sqrt(1 - a_prev - σ²)·eps + σ·noise (noise may be None when σ = 0)."""
    x_prev = jnp.sqrt(alpha_prev) * x0 + jnp.sqrt(1.0 - alpha_prev - sigma**2) * eps
    if noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev


def ddpm_step(
    schedule: DiffusionSchedule,
    x: jax.Array,
    t: jax.Array,
    model_output: jax.Array,
    noise: jax.Array,
    parameterization: str = "eps",
) -> jax.Array:
    """One ancestral step x_t -> x_{t-1}: posterior mean + exp(0.5·log_var_clipped)·noise, no noise at t = 0.

    x, model_output, noise: [B, H, W, C]; t: [B] int32. x0 is not clipped (as in LDM).
    """
    x0, _ = model_output_to_x0_eps(schedule, x, t, model_output, parameterization)
    coef1 = extract(schedule.posterior_mean_coef1, t, x.ndim)
    mean = coef1 * x0 + extract(schedule.posterior_mean_coef2, t, x.ndim) * x
    std = jnp.exp(0.5 * extract(schedule.posterior_log_variance_clipped, t, x.ndim))
    nonzero = (jnp.asarray(t) > 0).astype(x.dtype)
    nonzero = nonzero.reshape(nonzero.shape + (1,) * (x.ndim - nonzero.ndim))
    return mean + nonzero * std * noise


# ----------------------------------------------------------------------------------------------------------
# Shared loop helpers


def _full_t(t: jax.Array, batch: int) -> jax.Array:
    return jnp.full((batch,), t, dtype=jnp.int32)


def _is_zero(value: Any) -> bool:
    return isinstance(value, (int, float)) and value == 0


class _Blend:
    """Inpainting blend (see module doc); a no-op when mask is None."""

    def __init__(self, mask, x0_known, rng, num_steps):
        if (mask is None) != (x0_known is None):
            raise ValueError("inpainting needs both mask and x0_known (or neither)")
        self.active = mask is not None
        if self.active:
            if rng is None:
                raise ValueError("inpainting needs an rng for the blend noise")
            self.mask = jnp.asarray(mask, jnp.float32)
            self.x0 = jnp.asarray(x0_known, jnp.float32)
            self.keys = jax.random.split(rng, num_steps + 1)

    def __call__(self, x: jax.Array, alpha: jax.Array, key: jax.Array) -> jax.Array:
        if not self.active:
            return x
        z = jax.random.normal(key, x.shape, jnp.float32)
        known = jnp.sqrt(alpha) * self.x0 + jnp.sqrt(1.0 - alpha) * z
        return self.mask * known + (1.0 - self.mask) * x

    def start(self, x_T: jax.Array, alpha: jax.Array) -> jax.Array:
        """Blend x_T (cast to float32) with the known latent noised to the first step's level ``alpha``."""
        x_T = x_T.astype(jnp.float32)
        return self(x_T, alpha, self.keys[0]) if self.active else x_T

    def step_keys(self, num_steps: int) -> jax.Array:
        """[S] keys (or a dummy [S] array) to scan over alongside the steps."""
        return self.keys[1:] if self.active else jnp.zeros((num_steps,), jnp.uint32)


def _split_loop_rng(rng: jax.Array | None, num_steps: int, need_step_noise: bool):
    if rng is None:
        if need_step_noise:
            raise ValueError("this sampler needs an rng for its step noise")
        return None, None
    step_rng, blend_rng = jax.random.split(rng)
    return jax.random.split(step_rng, num_steps), blend_rng


def _final_blend_alphas(alphas_target: jax.Array) -> jax.Array:
    """Target noise levels per step with the last replaced by 1 (the known region ends exactly clean)."""
    return alphas_target.at[-1].set(1.0)


# ----------------------------------------------------------------------------------------------------------
# Samplers


def ddpm_sample(
    denoise_fn: DenoiseFn,
    schedule: DiffusionSchedule,
    x_T: jax.Array,
    rng: jax.Array,
    *,
    parameterization: str = "eps",
    mask: jax.Array | None = None,
    x0_known: jax.Array | None = None,
) -> jax.Array:
    """Ancestral sampling over all T steps (t = T-1 .. 0). x_T: [B, H, W, C] float32 -> x_0 (same shape)."""
    check_parameterization(parameterization)
    num = schedule.num_timesteps
    step_keys, blend_rng = _split_loop_rng(rng, num, need_step_noise=True)
    blend = _Blend(mask, x0_known, blend_rng, num)
    ts = np.arange(num - 1, -1, -1, dtype=np.int32)
    batch = x_T.shape[0]
    x = blend.start(x_T, schedule.alphas_cumprod[num - 1])

    def body(x, inputs):
        t, key, bkey = inputs
        tb = _full_t(t, batch)
        out = denoise_fn(x, tb)
        noise = jax.random.normal(key, x.shape, jnp.float32)
        x = ddpm_step(schedule, x, tb, out, noise, parameterization)
        return blend(x, schedule.alphas_cumprod_prev[t], bkey), None

    x, _ = jax.lax.scan(body, x, (jnp.asarray(ts), step_keys, blend.step_keys(num)))
    return x


def ddim_sample(
    denoise_fn: DenoiseFn,
    schedule: DiffusionSchedule,
    x_T: jax.Array,
    rng: jax.Array | None,
    *,
    num_steps: int,
    eta: float | jax.Array = 0.0,
    parameterization: str = "eps",
    spacing: str = "uniform",
    mask: jax.Array | None = None,
    x0_known: jax.Array | None = None,
) -> jax.Array:
    """DDIM (Song et al. 2021) as in CompVis: returns x after the last step (at noise level ᾱ_0).

    x_T: [B, H, W, C] float32 at the first (largest) DDIM timestep. ``rng`` may be None when eta == 0 and
    there is no mask.
    """
    check_parameterization(parameterization)
    steps = ddim_timesteps(num_steps, schedule.num_timesteps, spacing)
    alphas, alphas_prev, sigmas = ddim_parameters(schedule, steps, eta)
    s = len(steps)
    deterministic = _is_zero(eta)
    step_keys, blend_rng = _split_loop_rng(rng, s, need_step_noise=not deterministic)
    if step_keys is None:
        step_keys = jnp.zeros((s,), jnp.uint32)
    blend = _Blend(mask, x0_known, blend_rng, s)
    batch = x_T.shape[0]
    x = blend.start(x_T, alphas[-1])
    rev = lambda a: a[::-1]  # sampling order: largest t first
    blend_alphas = _final_blend_alphas(rev(alphas_prev))

    def body(x, inputs):
        t, a_prev, sigma, key, b_alpha, bkey = inputs
        tb = _full_t(t, batch)
        x0, eps = model_output_to_x0_eps(schedule, x, tb, denoise_fn(x, tb), parameterization)
        noise = None if deterministic else jax.random.normal(key, x.shape, jnp.float32)
        x = ddim_step(x0, eps, a_prev, sigma, noise)
        return blend(x, b_alpha, bkey), None

    xs = (
        jnp.asarray(rev(steps), jnp.int32), rev(alphas_prev), rev(sigmas), step_keys, blend_alphas, blend.step_keys(s)
    )
    x, _ = jax.lax.scan(body, x, xs)
    return x


# Adams-Bashforth weights on (e_t, e_{t+1}, e_{t+2}, e_{t+3}) for PLMS steps 1, 2 and >= 3.
_AB_WEIGHTS = np.array(
    [[3 / 2, -1 / 2, 0.0, 0.0], [23 / 12, -16 / 12, 5 / 12, 0.0], [55 / 24, -59 / 24, 37 / 24, -9 / 24]],
    dtype=np.float32,
)


def plms_sample(
    denoise_fn: DenoiseFn,
    schedule: DiffusionSchedule,
    x_T: jax.Array,
    rng: jax.Array | None = None,
    *,
    num_steps: int,
    parameterization: str = "eps",
    spacing: str = "uniform",
    mask: jax.Array | None = None,
    x0_known: jax.Array | None = None,
) -> jax.Array:
    """CompVis PLMS (Liu et al. 2022 pseudo linear multistep), eta = 0, on the DDIM timesteps.

    Step 0 is a pseudo improved-Euler step: eps' = (e(x, t_0) + e(x', t_1)) / 2 with x' the DDIM step of
    e(x, t_0) (two network calls); step i >= 1 uses 2nd/3rd/4th-order Adams-Bashforth on the eps history
    (one call). Each eps' goes through a DDIM step (σ = 0) with x0 = (x - sqrt(1-a)·eps')/sqrt(a).
    ``rng`` is only used by the inpainting blend.
    """
    check_parameterization(parameterization)
    steps = ddim_timesteps(num_steps, schedule.num_timesteps, spacing)[::-1]
    s = len(steps)
    ac = schedule.alphas_cumprod
    alphas = ac[steps]
    alphas_prev = jnp.concatenate([ac[steps[1:]], ac[:1]])
    _, blend_rng = _split_loop_rng(rng, s, need_step_noise=False)
    blend = _Blend(mask, x0_known, blend_rng, s)
    blend_alphas = _final_blend_alphas(alphas_prev)
    bkeys = blend.step_keys(s)
    batch = x_T.shape[0]

    def eps_of(x, t):
        tb = _full_t(t, batch)
        return model_output_to_x0_eps(schedule, x, tb, denoise_fn(x, tb), parameterization)[1]

    def step(x, e, a, a_prev):
        x0 = (x - jnp.sqrt(1.0 - a) * e) / jnp.sqrt(a)
        return ddim_step(x0, e, a_prev, 0.0, None)

    x = blend.start(x_T, alphas[0])
    # Step 0: pseudo improved Euler (CompVis evaluates the second call at the next timestep, or at t_0 if S = 1).
    e0 = eps_of(x, steps[0])
    x_euler = step(x, e0, alphas[0], alphas_prev[0])
    e_next = eps_of(x_euler, steps[1] if s > 1 else steps[0])
    x = step(x, (e0 + e_next) / 2.0, alphas[0], alphas_prev[0])
    x = blend(x, blend_alphas[0], bkeys[0])
    if s == 1:
        return x

    def body(carry, inputs):
        x, e1, e2, e3 = carry
        t, a, a_prev, w, b_alpha, bkey = inputs
        e = eps_of(x, t)
        e_prime = w[0] * e + w[1] * e1 + w[2] * e2 + w[3] * e3
        x = blend(step(x, e_prime, a, a_prev), b_alpha, bkey)
        return (x, e, e1, e2), None

    weights = _AB_WEIGHTS[np.minimum(np.arange(s - 1), 2)]
    zeros = jnp.zeros_like(x)
    xs = (
        jnp.asarray(steps[1:], jnp.int32), alphas[1:], alphas_prev[1:], jnp.asarray(weights), blend_alphas[1:],
        bkeys[1:],
    )
    (x, _, _, _), _ = jax.lax.scan(body, (x, e0, zeros, zeros), xs)
    return x


def dpm_solver_pp_coefficients(
    schedule: DiffusionSchedule, timesteps: np.ndarray
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-step coefficients (c_x, c_0, c_1), each [S], of DPM-Solver++(2M) on descending ``timesteps`` [S].

    Step i goes from t_i to t_{i+1} (after the last, to σ = 0) as
    x_{i+1} = c_x·x_i + c_0·D_i + c_1·(D_i - D_{i-1}), D = predicted x0, with α = sqrt(ᾱ), σ = sqrt(1 - ᾱ),
    λ = log(α/σ), h_i = λ_{i+1} - λ_i: c_x = σ_{i+1}/σ_i, c_0 = -α_{i+1}·expm1(-h_i) and, for the
    second-order (midpoint) steps, c_1 = c_0 / (2 r_i) with r_i = h_{i-1}/h_i. Step 0 and the last step are
    first order (c_1 = 0); the last step lands on α = 1, σ = 0, so it returns D exactly.
    """
    ac = schedule.alphas_cumprod[timesteps]
    s = len(timesteps)
    alpha = jnp.sqrt(ac)
    sigma = jnp.sqrt(1.0 - ac)
    lam = jnp.log(alpha) - jnp.log(sigma)
    # Target of each step; the final target (σ = 0) is handled by the overrides below.
    alpha_next = jnp.concatenate([alpha[1:], jnp.ones((1,), jnp.float32)])
    sigma_next = jnp.concatenate([sigma[1:], jnp.ones((1,), jnp.float32)])  # placeholder 1 at the end
    lam_next = jnp.concatenate([lam[1:], lam[-1:] + 1.0])  # placeholder, overridden
    h = lam_next - lam
    c_x = sigma_next / sigma
    c_0 = -alpha_next * jnp.expm1(-h)
    h_prev = jnp.concatenate([h[:1], h[:-1]])  # h_{i-1}; entry 0 unused
    c_1 = c_0 * h / (2.0 * h_prev)
    last = np.arange(s) == s - 1
    first_order = (np.arange(s) == 0) | last
    c_x = jnp.where(last, 0.0, c_x)
    c_0 = jnp.where(last, 1.0, c_0)
    c_1 = jnp.where(first_order, 0.0, c_1)
    return c_x, c_0, c_1


def dpm_solver_pp_sample(
    denoise_fn: DenoiseFn,
    schedule: DiffusionSchedule,
    x_T: jax.Array,
    rng: jax.Array | None = None,
    *,
    num_steps: int,
    parameterization: str = "eps",
    mask: jax.Array | None = None,
    x0_known: jax.Array | None = None,
) -> jax.Array:
    """DPM-Solver++(2M) (Lu et al. 2022), data prediction, multistep, first-order first and last steps.

    Time discretization: ``dpm_solver_timesteps`` (diffusers' default "linspace" grid, t = T-1 first), and
    the last step goes to σ = 0 (diffusers' ``final_sigmas_type="zero"``), so the result is the clean
    x0 estimate. x_T: [B, H, W, C] float32 at t = T-1. ``rng`` is only used by the inpainting blend.
    """
    check_parameterization(parameterization)
    steps = dpm_solver_timesteps(num_steps, schedule.num_timesteps)[::-1]
    s = len(steps)
    c_x, c_0, c_1 = dpm_solver_pp_coefficients(schedule, steps)
    ac = schedule.alphas_cumprod
    _, blend_rng = _split_loop_rng(rng, s, need_step_noise=False)
    blend = _Blend(mask, x0_known, blend_rng, s)
    blend_alphas = _final_blend_alphas(jnp.concatenate([ac[steps[1:]], ac[:1]]))
    batch = x_T.shape[0]
    x = blend.start(x_T, ac[steps[0]])

    def body(carry, inputs):
        x, d_prev = carry
        t, cx, c0, c1, b_alpha, bkey = inputs
        tb = _full_t(t, batch)
        d, _ = model_output_to_x0_eps(schedule, x, tb, denoise_fn(x, tb), parameterization)
        x = cx * x + c0 * d + c1 * (d - d_prev)
        return (blend(x, b_alpha, bkey), d), None

    xs = (jnp.asarray(steps, jnp.int32), c_x, c_0, c_1, blend_alphas, blend.step_keys(s))
    (x, _), _ = jax.lax.scan(body, (x, jnp.zeros_like(x)), xs)
    return x


# ----------------------------------------------------------------------------------------------------------
# Entry point


def sample(
    model_fn: ModelFn,
    schedule: DiffusionSchedule,
    shape: tuple[int, ...],
    rng: jax.Array,
    *,
    sampler: str = "ddim",
    num_steps: int | None = None,
    eta: float | jax.Array = 0.0,
    guidance_scale: float | jax.Array = 1.0,
    cond: Any = None,
    uncond: Any = None,
    parameterization: str = "eps",
    x_T: jax.Array | None = None,
    mask: jax.Array | None = None,
    x0_known: jax.Array | None = None,
    spacing: str = "uniform",
) -> jax.Array:
    """Draw samples [B, H, W, C] float32 (latents, not clipped) from ``model_fn``.

    Args:
      model_fn: (x [B, H, W, C], t [B] int32, cond) -> output [B, H, W, C] in ``parameterization``.
      schedule: the diffusion schedule the model was trained with.
      shape: (B, H, W, C), static.
      rng: key, split into (x_T key, loop key) (see the module doc).
      sampler: "ddim", "ddpm", "plms" or "dpm_solver++" (static).
      num_steps: sampler steps (static); "ddpm" runs all T steps and accepts only None or T.
      eta: DDIM noise scale (0 = deterministic); must be 0 for the other samplers.
      guidance_scale, cond, uncond: classifier-free guidance, see ``guided_model_fn``.
      x_T: optional start [B, H, W, C] float32; standard normal from the x_T key if None.
      mask, x0_known: inpainting, see the module doc (1 in mask = keep x0_known).
      spacing: DDIM/PLMS timestep spacing, "uniform" or "quad"; the other samplers accept only "uniform".
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if sampler not in ("ddim", "plms") and spacing != "uniform":
        raise ValueError(f"spacing {spacing!r} is only for ddim and plms, not {sampler!r}")
    if sampler != "ddim" and not _is_zero(eta):
        raise ValueError(f"eta is a DDIM option; {sampler!r} needs eta = 0, got {eta}")
    if sampler == "ddpm":
        if num_steps not in (None, schedule.num_timesteps):
            raise ValueError(f"ddpm runs all {schedule.num_timesteps} steps; got num_steps={num_steps}")
    elif num_steps is None:
        raise ValueError(f"sampler {sampler!r} needs num_steps")
    denoise_fn = guided_model_fn(model_fn, guidance_scale, cond, uncond)
    rng_x, rng_loop = jax.random.split(rng)
    if x_T is None:
        x_T = jax.random.normal(rng_x, tuple(shape), jnp.float32)
    elif tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T has shape {x_T.shape}, expected {tuple(shape)}")
    common = dict(parameterization=parameterization, mask=mask, x0_known=x0_known)
    if sampler == "ddpm":
        return ddpm_sample(denoise_fn, schedule, x_T, rng_loop, **common)
    if sampler == "ddim":
        return ddim_sample(denoise_fn, schedule, x_T, rng_loop, num_steps=num_steps, eta=eta, spacing=spacing, **common)
    if sampler == "plms":
        return plms_sample(denoise_fn, schedule, x_T, rng_loop, num_steps=num_steps, spacing=spacing, **common)
    return dpm_solver_pp_sample(denoise_fn, schedule, x_T, rng_loop, num_steps=num_steps, **common)

