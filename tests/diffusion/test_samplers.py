"""Samplers vs diffusers schedulers (PyTorch) and closed forms; guidance; inpainting; jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

from lidiff.diffusion import samplers as smp
from lidiff.diffusion.process import model_output_to_x0_eps, q_sample, v_from_x0_eps
from lidiff.diffusion.schedule import DiffusionSchedule

CELEBA = dict(linear_start=0.0015, linear_end=0.0195)
SCHED = DiffusionSchedule.create("scaled_linear", 1000, **CELEBA)
SMALL = DiffusionSchedule.create("scaled_linear", 40, linear_start=0.01, linear_end=0.2)  # for full DDPM loops
HF = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195)
SHAPE = (2, 4, 4, 3)
X_T = np.random.RandomState(0).randn(*SHAPE).astype(np.float32)
X0 = np.random.RandomState(1).uniform(-1, 1, SHAPE).astype(np.float32)


def eps_jax(x, t, cond=None):
    """A fixed deterministic 'network': eps = 0.1·x + sin(t)."""
    return 0.1 * x + jnp.sin(t.astype(jnp.float32))[:, None, None, None]


def eps_torch(x, t):
    return 0.1 * x + torch.sin(torch.tensor(float(t)))


def run_diffusers(scheduler, steps, x_T=X_T, noises=None, **step_kwargs):
    """Run a diffusers scheduler loop with ``eps_torch`` from NHWC x_T; returns NHWC numpy."""
    scheduler.set_timesteps(steps)
    x = torch.from_numpy(x_T).permute(0, 3, 1, 2)
    for i, t in enumerate(scheduler.timesteps):
        kw = dict(step_kwargs)
        if noises is not None:
            kw["variance_noise"] = torch.from_numpy(noises[i]).permute(0, 3, 1, 2)
        x = scheduler.step(eps_torch(x, int(t)), t, x, **kw).prev_sample
    return x.permute(0, 2, 3, 1).numpy()


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def oracle(schedule, x0, parameterization="eps"):
    """A model that knows x0: returns the output in ``parameterization`` consistent with (x_t, x0)."""

    def fn(x, t, cond=None):
        ac = schedule.alphas_cumprod[t][:, None, None, None]
        eps = (x - jnp.sqrt(ac) * x0) / jnp.sqrt(1.0 - ac)
        return {"eps": eps, "x0": jnp.broadcast_to(x0, x.shape), "v": v_from_x0_eps(schedule, x0, t, eps)}[
            parameterization
        ]

    return fn


# ---------------------------------------------------------------------------------------------- timesteps


def test_ddim_timesteps_match_compvis_and_diffusers():
    t50 = smp.ddim_timesteps(50)
    assert t50[-1] == 981 and t50[0] == 1 and len(t50) == 50
    t200 = smp.ddim_timesteps(200)
    assert (t200[0], t200[1], t200[-1], len(t200)) == (1, 6, 996, 200)
    for steps in [10, 50, 200, 250]:
        ref = DDIMScheduler(**HF, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
        ref.set_timesteps(steps)
        np.testing.assert_array_equal(smp.ddim_timesteps(steps)[::-1], ref.timesteps.numpy())
    # CompVis quirks kept on purpose: 'quad' spacing, and arange(0, T, T // S) has 500 entries for S = 400;
    # for S = 300 it reaches t = 1000, past the table (CompVis fails with an IndexError there).
    np.testing.assert_array_equal(smp.ddim_timesteps(2, spacing="quad"), [1, 801])
    assert len(smp.ddim_timesteps(400)) == 500 and smp.ddim_timesteps(400)[-1] == 999
    with pytest.raises(ValueError, match="reach t = 1000"):
        smp.ddim_timesteps(300)
    with pytest.raises(ValueError, match="spacing 'cubic'"):
        smp.ddim_timesteps(10, spacing="cubic")


def test_ddim_parameters_last_step_goes_to_alpha_0():
    steps = smp.ddim_timesteps(50)
    a, a_prev, sig = smp.ddim_parameters(SCHED, steps, eta=0.5)
    ac = np.asarray(SCHED.alphas_cumprod)
    assert float(a_prev[0]) == ac[0] and float(a[0]) == ac[1]  # from t = 1 to ᾱ_0, not to 1
    np.testing.assert_array_equal(np.asarray(a_prev[1:]), ac[steps[:-1]])
    ref = DDIMScheduler(**HF, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
    ref.set_timesteps(50)
    for i in [0, 1, 25, 49]:
        var = float(ref._get_variance(int(steps[i]), int(steps[i]) - 20))
        assert float(sig[i]) == pytest.approx(0.5 * np.sqrt(var), rel=1e-4)


def test_dpm_solver_timesteps_are_diffusers_linspace():
    for steps in [5, 20]:
        ref = DPMSolverMultistepScheduler(**HF, timestep_spacing="linspace")
        ref.set_timesteps(steps)
        np.testing.assert_array_equal(smp.dpm_solver_timesteps(steps)[::-1], ref.timesteps.numpy())


# ---------------------------------------------------------------------------------------------- DDIM


@pytest.mark.parametrize("steps", [50])
def test_ddim_loop_matches_diffusers(steps):
    ref = run_diffusers(
        DDIMScheduler(**HF, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, clip_sample=False),
        steps,
        eta=0.0,
    )
    ours = smp.ddim_sample(eps_jax, SCHED, jnp.asarray(X_T), None, num_steps=steps)
    assert rel(ours, ref) < 1e-5


def test_ddim_with_eta_matches_diffusers_given_the_same_noise():
    steps, eta = 10, 1.0
    rng = jax.random.PRNGKey(5)
    ours = smp.ddim_sample(eps_jax, SCHED, jnp.asarray(X_T), rng, num_steps=steps, eta=eta)
    # The documented noise: loop key -> (step key, blend key); step i uses split(step key, S)[i].
    step_keys = jax.random.split(jax.random.split(rng)[0], steps)
    noises = [np.array(jax.random.normal(k, SHAPE)) for k in step_keys]
    make = lambda: DDIMScheduler(**HF, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                                 clip_sample=False)
    ref = run_diffusers(make(), steps, noises=noises, eta=eta)
    assert rel(ours, ref) < 1e-5
    # The noise matters: the deterministic (eta = 0) result is far away.
    assert rel(ours, run_diffusers(make(), steps, eta=0.0)) > 0.05


@pytest.mark.parametrize("spacing", ["uniform", "quad"])
def test_ddim_oracle_lands_on_alpha_0_level(spacing):
    # With the true noise, every DDIM step maps q_sample(x0, t, n) to q_sample(x0, t_prev, n); the last step
    # goes to ᾱ_0 (CompVis), so the result is q_sample(x0, 0, n), not x0 itself.
    noise = jnp.asarray(X_T)
    t_first = int(smp.ddim_timesteps(25, spacing=spacing)[-1])
    x_T = q_sample(SCHED, jnp.asarray(X0), jnp.full((2,), t_first), noise)
    out = smp.ddim_sample(oracle(SCHED, X0), SCHED, x_T, None, num_steps=25, spacing=spacing)
    expected = q_sample(SCHED, jnp.asarray(X0), jnp.zeros((2,), jnp.int32), noise)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=2e-5)
    assert float(jnp.max(jnp.abs(out - X0))) > 0.05  # ᾱ_0 < 1: the noise term sqrt(β_0)·n remains


# ---------------------------------------------------------------------------------------------- DDPM


def test_ddpm_step_matches_diffusers_over_the_whole_chain():
    ref = DDPMScheduler(**HF, variance_type="fixed_small", clip_sample=False)
    ref.set_timesteps(1000)
    step = jax.jit(smp.ddpm_step)
    x_ref = torch.from_numpy(X_T).permute(0, 3, 1, 2)
    x = jnp.asarray(X_T)
    for t in ref.timesteps:
        t = int(t)
        gen = torch.Generator().manual_seed(t)
        x_ref = ref.step(eps_torch(x_ref, t), t, x_ref, generator=gen).prev_sample
        # diffusers draws its variance noise with randn from the generator: redraw the same numbers.
        noise = torch.randn(x_ref.shape, generator=torch.Generator().manual_seed(t)).permute(0, 2, 3, 1).numpy()
        tb = jnp.full((SHAPE[0],), t, jnp.int32)
        x = step(SCHED, x, tb, eps_jax(x, tb), jnp.asarray(noise))
    assert rel(x, x_ref.permute(0, 2, 3, 1).numpy()) < 1e-5


def test_ddpm_sample_is_the_step_loop_with_documented_noise():
    rng = jax.random.PRNGKey(3)
    out = smp.ddpm_sample(eps_jax, SMALL, jnp.asarray(X_T), rng)
    keys = jax.random.split(jax.random.split(rng)[0], SMALL.num_timesteps)
    x = jnp.asarray(X_T)
    for i, t in enumerate(range(SMALL.num_timesteps - 1, -1, -1)):
        tb = jnp.full((SHAPE[0],), t, jnp.int32)
        x = smp.ddpm_step(SMALL, x, tb, eps_jax(x, tb), jax.random.normal(keys[i], SHAPE))
    np.testing.assert_allclose(np.asarray(out), np.asarray(x), atol=1e-5)


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_ddpm_oracle_recovers_x0(parameterization):
    # At t = 0 the posterior mean is exactly the predicted x0 and no noise is added.
    out = smp.sample(oracle(SMALL, X0, parameterization), SMALL, SHAPE, jax.random.PRNGKey(0), sampler="ddpm",
                     parameterization=parameterization)
    np.testing.assert_allclose(np.asarray(out), X0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- PLMS


@pytest.mark.parametrize("steps", [2, 20])
def test_plms_matches_diffusers_pndm(steps):
    # diffusers' PNDM with skip_prk_steps is CompVis's PLMS: its repeated timestep runs the pseudo
    # improved-Euler first step (second call at the next timestep, averaged eps, restart from x), and its
    # "formula (9)" update equals the DDIM eta = 0 step algebraically. (With S = 1 diffusers skips the
    # second call, CompVis does not; that case is left out.)
    ref = run_diffusers(PNDMScheduler(**HF, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1), steps)
    ours = smp.plms_sample(eps_jax, SCHED, jnp.asarray(X_T), num_steps=steps)
    assert rel(ours, ref) < 1e-5


def test_plms_oracle_lands_on_alpha_0_level():
    noise = jnp.asarray(X_T)
    x_T = q_sample(SCHED, jnp.asarray(X0), jnp.full((2,), 951), noise)
    out = smp.plms_sample(oracle(SCHED, X0), SCHED, x_T, num_steps=20)
    expected = q_sample(SCHED, jnp.asarray(X0), jnp.zeros((2,), jnp.int32), noise)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=2e-5)


# ---------------------------------------------------------------------------------------------- DPM-Solver++


@pytest.mark.parametrize("steps", [1, 2, 20])
def test_dpm_solver_pp_matches_diffusers(steps):
    sched = DPMSolverMultistepScheduler(**HF, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                        lower_order_final=True, final_sigmas_type="zero", timestep_spacing="linspace")
    ref = run_diffusers(sched, steps)
    ours = smp.dpm_solver_pp_sample(eps_jax, SCHED, jnp.asarray(X_T), num_steps=steps)
    assert rel(ours, ref) < 1e-5


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_dpm_solver_pp_oracle_recovers_x0(parameterization):
    x_T = q_sample(SCHED, jnp.asarray(X0), jnp.full((2,), 999), jnp.asarray(X_T))
    out = smp.dpm_solver_pp_sample(oracle(SCHED, X0, parameterization), SCHED, x_T, num_steps=15,
                                   parameterization=parameterization)
    np.testing.assert_allclose(np.asarray(out), X0, atol=1e-4)


# ---------------------------------------------------------------------------------------------- parameterizations


@pytest.mark.parametrize("sampler, parameterization", [("ddim", "x0"), ("plms", "v"), ("dpm_solver++", "v")])
def test_samplers_agree_across_parameterizations(sampler, parameterization):
    # The same network expressed as an x0- or v-predictor must give the same samples as the eps one.
    def as_other(x, t, cond=None):
        x0, eps = model_output_to_x0_eps(SCHED, x, t, eps_jax(x, t), "eps")
        return x0 if parameterization == "x0" else v_from_x0_eps(SCHED, x0, t, eps)

    kw = dict(sampler=sampler, num_steps=10, x_T=jnp.asarray(X_T))
    ref = smp.sample(eps_jax, SCHED, SHAPE, jax.random.PRNGKey(0), **kw)
    out = smp.sample(as_other, SCHED, SHAPE, jax.random.PRNGKey(0), parameterization=parameterization, **kw)
    assert rel(out, np.asarray(ref)) < 1e-4


# ---------------------------------------------------------------------------------------------- guidance


def _cond_model(calls):
    def model_fn(x, t, cond):
        calls.append(x.shape[0])
        ctx = cond["context"].mean(axis=(1, 2))[:, None, None, None]
        return 0.1 * x + ctx + 0.05 * cond["y"].astype(jnp.float32)[:, None, None, None] + jnp.sin(
            t.astype(jnp.float32)
        )[:, None, None, None]

    return model_fn


COND = {"context": jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4) / 10.0, "y": jnp.array([3, 7])}
UNCOND = {"context": jnp.zeros((2, 3, 4)), "y": jnp.array([1000, 1000])}


def test_guidance_is_one_batched_call_with_the_cfg_combination():
    calls = []
    x, t = jnp.asarray(X_T), jnp.array([10, 10])
    out = smp.guided_model_fn(_cond_model(calls), 3.0, COND, UNCOND)(x, t)
    assert calls == [4]  # one call of 2B
    m = _cond_model([])
    e_c, e_u = m(x, t, COND), m(x, t, UNCOND)
    np.testing.assert_allclose(np.asarray(out), np.asarray(e_u + 3.0 * (e_c - e_u)), atol=1e-5)
    # s = 0 is the unconditional model, s = 1 the conditional one in a single call of B.
    np.testing.assert_allclose(np.asarray(smp.guided_model_fn(m, 0.0, COND, UNCOND)(x, t)), np.asarray(e_u), atol=1e-6)
    calls.clear()
    np.testing.assert_array_equal(np.asarray(smp.guided_model_fn(_cond_model(calls), 1.0, COND, UNCOND)(x, t)),
                                  np.asarray(e_c))
    assert calls == [2]
    with pytest.raises(ValueError, match="same tree structure"):
        smp.guided_model_fn(m, 2.0, COND, {"context": UNCOND["context"]})


def test_guidance_in_v_space_equals_guidance_on_eps():
    x, t = jnp.asarray(X_T), jnp.array([500, 20])
    m = _cond_model([])

    def v_model(x, t, cond):
        x0, eps = model_output_to_x0_eps(SCHED, x, t, m(x, t, cond), "eps")
        return v_from_x0_eps(SCHED, x0, t, eps)

    v_guided = smp.guided_model_fn(v_model, 4.0, COND, UNCOND)(x, t)
    _, eps_from_v = model_output_to_x0_eps(SCHED, x, t, v_guided, "v")
    eps_guided = smp.guided_model_fn(m, 4.0, COND, UNCOND)(x, t)
    np.testing.assert_allclose(np.asarray(eps_from_v), np.asarray(eps_guided), atol=1e-4)


def test_sample_with_guidance_matches_manual_cfg_model():
    m = _cond_model([])
    manual = lambda x, t, cond: (1 - 2.5) * m(x, t, UNCOND) + 2.5 * m(x, t, COND)
    kw = dict(sampler="ddim", num_steps=10, x_T=jnp.asarray(X_T))
    out = smp.sample(m, SCHED, SHAPE, jax.random.PRNGKey(0), guidance_scale=2.5, cond=COND, uncond=UNCOND, **kw)
    ref = smp.sample(manual, SCHED, SHAPE, jax.random.PRNGKey(0), **kw)
    assert rel(out, np.asarray(ref)) < 1e-5


# ---------------------------------------------------------------------------------------------- inpainting


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "plms", "dpm_solver++"])
def test_inpainting_keeps_the_known_region(sampler):
    sched = SMALL if sampler == "ddpm" else SCHED
    mask = np.zeros(SHAPE[:3] + (1,), np.float32)
    mask[:, :, :2] = 1.0  # keep the left half
    kw = dict(sampler=sampler, num_steps=None if sampler == "ddpm" else 10, eta=0.5 if sampler == "ddim" else 0.0)
    # A 'network' that mixes information across pixels, so the known half can influence the rest.
    model = lambda x, t, cond: 0.5 * x + 0.3 * jnp.mean(x, axis=(1, 2), keepdims=True)
    out = np.asarray(smp.sample(model, sched, SHAPE, jax.random.PRNGKey(1), mask=mask, x0_known=X0, **kw))
    np.testing.assert_array_equal(out[:, :, :2], X0[:, :, :2])  # exactly: the last blend is at ᾱ = 1
    assert np.abs(out[:, :, 2:] - X0[:, :, 2:]).max() > 0.1
    if sampler == "ddim":
        # The known region steers the rest: the unknown half differs from unconstrained sampling.
        free = np.asarray(smp.sample(model, sched, SHAPE, jax.random.PRNGKey(1), **kw))
        assert np.abs(out[:, :, 2:] - free[:, :, 2:]).max() > 1e-3
    with pytest.raises(ValueError, match="both mask and x0_known"):
        smp.sample(model, sched, SHAPE, jax.random.PRNGKey(1), mask=mask, **kw)


# ---------------------------------------------------------------------------------------------- jit and errors


@pytest.mark.parametrize("sampler, traces", [("ddim", 1), ("plms", 3), ("dpm_solver++", 1)])
def test_sample_jits_without_python_step_loops(sampler, traces):
    calls = []
    model = _cond_model(calls)
    jitted = jax.jit(functools.partial(smp.sample, model),
                     static_argnames=("shape", "sampler", "num_steps", "parameterization", "spacing"))
    kw = dict(sampler=sampler, num_steps=20, cond=COND, uncond=UNCOND)
    out = jitted(SCHED, SHAPE, jax.random.PRNGKey(2), guidance_scale=jnp.float32(2.0), **kw)
    # 20 steps, but the model is traced once per scan body (plms: +2 for its unrolled first step), batch 2B.
    assert calls == [4] * traces
    if sampler == "plms":  # jit and eager agree (checked once, for the most involved loop)
        eager = smp.sample(model, SCHED, SHAPE, jax.random.PRNGKey(2), guidance_scale=2.0, **kw)
        assert rel(out, np.asarray(eager)) < 1e-5


def test_bad_arguments_are_refused():
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        smp.sample(eps_jax, SCHED, SHAPE, key, sampler="euler", num_steps=10)
    with pytest.raises(ValueError, match="needs eta = 0"):
        smp.sample(eps_jax, SCHED, SHAPE, key, sampler="plms", num_steps=10, eta=0.5)
    with pytest.raises(ValueError, match="ddpm runs all 1000 steps"):
        smp.sample(eps_jax, SCHED, SHAPE, key, sampler="ddpm", num_steps=50)
    with pytest.raises(ValueError, match="needs num_steps"):
        smp.sample(eps_jax, SCHED, SHAPE, key, sampler="ddim")
    with pytest.raises(ValueError, match="only for ddim and plms"):
        smp.sample(eps_jax, SCHED, SHAPE, key, sampler="dpm_solver++", num_steps=10, spacing="quad")
    with pytest.raises(ValueError, match="needs an rng"):
        smp.ddim_sample(eps_jax, SCHED, jnp.asarray(X_T), None, num_steps=10, eta=1.0)
    with pytest.raises(ValueError, match="x_T has shape"):
        smp.sample(eps_jax, SCHED, SHAPE, key, num_steps=10, x_T=jnp.zeros((1, 4, 4, 3)))
