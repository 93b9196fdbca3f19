"""Noise schedules of the discrete-time diffusion process (T steps, t = 0 .. T-1).

Everything is computed in float64 numpy and cast to float32 once, as the LDM reference does, so the
float32 tables carry no accumulated cumprod error.

Schedule names are the ones diffusers uses, which say what is computed; CompVis names differ (its
``"linear"`` is linear in sqrt(beta)). ``COMPVIS_SCHEDULE_NAMES`` maps a CompVis YAML name to ours.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

SCHEDULE_NAMES = ("scaled_linear", "linear", "cosine", "sqrt")

# CompVis ``beta_schedule`` name -> lidiff name.
COMPVIS_SCHEDULE_NAMES = {
    "linear": "scaled_linear",
    "sqrt_linear": "linear",
    "cosine": "cosine",
    "sqrt": "sqrt",
}


def make_beta_schedule(
    name: str,
    num_timesteps: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> np.ndarray:
    """Betas of a named schedule. Returns [num_timesteps] float64 in (0, 1).

    - ``"scaled_linear"``: linspace(sqrt(linear_start), sqrt(linear_end), T) ** 2 (CompVis "linear").
    - ``"linear"``: linspace(linear_start, linear_end, T) (CompVis "sqrt_linear").
    - ``"cosine"``: Nichol & Dhariwal's cosine alpha-bar with offset ``cosine_s``, betas clipped to
      [0, 0.999].
    - ``"sqrt"``: linspace(linear_start, linear_end, T) ** 0.5 (CompVis "sqrt").
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if name == "scaled_linear":
        betas = np.linspace(math.sqrt(linear_start), math.sqrt(linear_end), num_timesteps, dtype=np.float64) ** 2
    elif name == "linear":
        betas = np.linspace(linear_start, linear_end, num_timesteps, dtype=np.float64)
    elif name == "cosine":
        s = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps + cosine_s
        alpha_bar = np.cos(s / (1.0 + cosine_s) * (math.pi / 2.0)) ** 2
        alpha_bar = alpha_bar / alpha_bar[0]
        betas = np.clip(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.0, 0.999)
    elif name == "sqrt":
        betas = np.linspace(linear_start, linear_end, num_timesteps, dtype=np.float64) ** 0.5
    else:
        hint = ""
        if name in COMPVIS_SCHEDULE_NAMES:  # only CompVis names that are not also ours reach here
            hint = f" (CompVis {name!r} is {COMPVIS_SCHEDULE_NAMES[name]!r} here)"
        raise ValueError(f"unknown beta schedule {name!r}; choose one of {SCHEDULE_NAMES}{hint}")
    return betas


def _f32(x: np.ndarray) -> jax.Array:
    return jnp.asarray(np.asarray(x, dtype=np.float64).astype(np.float32))


@flax.struct.dataclass
class DiffusionSchedule:
    """Per-timestep tables of a discrete diffusion process; every array is [T] float32.

    Index with an int timestep t in [0, T-1]. ``alphas_cumprod`` is ᾱ_t = prod_{s<=t} (1 - β_s);
    ``alphas_cumprod_prev[t]`` is ᾱ_{t-1} with ᾱ_{-1} = 1. The posterior q(x_{t-1} | x_t, x_0) has mean
    ``coef1[t]·x0 + coef2[t]·x_t`` and variance ``posterior_variance[t]`` (0 at t = 0; its log is clipped
    at log(1e-20)). ``num_timesteps`` is static (not a pytree leaf), so it is a Python int under jit.
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    num_timesteps: int = flax.struct.field(pytree_node=False, default=1000)

    @classmethod
    def from_betas(cls, betas: np.ndarray) -> "DiffusionSchedule":
        """Schedule from given betas ([T], any float dtype; computed in float64)."""
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] < 1:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not np.all((betas > 0) & (betas < 1)):
            raise ValueError("betas must lie in the open interval (0, 1)")
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        return cls(
            betas=_f32(betas),
            alphas_cumprod=_f32(ac),
            alphas_cumprod_prev=_f32(ac_prev),
            sqrt_alphas_cumprod=_f32(np.sqrt(ac)),
            sqrt_one_minus_alphas_cumprod=_f32(np.sqrt(1.0 - ac)),
            sqrt_recip_alphas_cumprod=_f32(np.sqrt(1.0 / ac)),
            sqrt_recipm1_alphas_cumprod=_f32(np.sqrt(1.0 / ac - 1.0)),
            posterior_variance=_f32(post_var),
            posterior_log_variance_clipped=_f32(np.log(np.maximum(post_var, 1e-20))),
            posterior_mean_coef1=_f32(betas * np.sqrt(ac_prev) / (1.0 - ac)),
            posterior_mean_coef2=_f32((1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)),
            num_timesteps=int(betas.shape[0]),
        )

    @classmethod
    def create(
        cls,
        name: str,
        num_timesteps: int = 1000,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
    ) -> "DiffusionSchedule":
        """Schedule for a named beta schedule (see ``make_beta_schedule``; defaults are CompVis's)."""
        return cls.from_betas(make_beta_schedule(name, num_timesteps, linear_start, linear_end, cosine_s))

    def snr(self, t: jax.Array) -> jax.Array:
        """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t). t: int array of any shape -> float32, same shape."""
        ac = self.alphas_cumprod[t]
        return ac / (1.0 - ac)
