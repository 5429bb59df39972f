"""CPU unit tests of the MLPerf objective (flux_nemo.flow_matching)."""

import pytest
import torch

from flux_nemo import flow_matching as fm


def test_pack_matches_einops_pattern_and_round_trips():
    z = torch.randn(2, 16, 8, 6)
    x = fm.pack_latents(z)
    assert x.shape == (2, 12, 64)
    # b c (h 2) (w 2) -> b (h w) (c 2 2), written out element by element for one token
    b, h, w = 1, 2, 1
    token = x[b, h * 3 + w].reshape(16, 2, 2)
    torch.testing.assert_close(token, z[b, :, 2 * h : 2 * h + 2, 2 * w : 2 * w + 2])
    torch.testing.assert_close(fm.unpack_latents(x, 8, 6), z)


def test_official_shapes():
    assert fm.pack_latents(torch.zeros(1, 16, 32, 32)).shape == (1, 256, 64)


def test_image_ids_row_major_and_text_ids_zero():
    ids = fm.image_ids(2, 3, 4)
    assert ids.shape == (2, 12, 3)
    assert torch.equal(ids[1, 4 + 2], torch.tensor([0.0, 1.0, 2.0]))  # row 1, col 2
    assert torch.all(ids[..., 0] == 0)
    assert torch.equal(fm.text_ids(2, 5), torch.zeros(2, 5, 3))


def test_posterior_sample_and_scaling():
    torch.manual_seed(0)
    mean = torch.full((4096,), 2.0)
    logvar = torch.full((4096,), 2 * torch.log(torch.tensor(0.5)).item())  # std 0.5
    z = fm.sample_posterior(mean, logvar)
    assert abs(z.mean().item() - 2.0) < 0.05 and abs(z.std().item() - 0.5) < 0.05
    torch.manual_seed(0)
    eps = torch.randn_like(mean)
    torch.testing.assert_close(z, mean + 0.5 * eps)
    assert fm.scale_latents(torch.tensor(1.1159)).item() == pytest.approx(0.3611)


def test_two_posterior_draws_differ():
    mean, logvar = torch.zeros(8), torch.zeros(8)
    assert not torch.equal(fm.sample_posterior(mean, logvar), fm.sample_posterior(mean, logvar))


def test_cfg_dropout_replaces_t5_and_clip_together():
    torch.manual_seed(1)
    n = 4000
    t5, clip = torch.ones(n, 3, 2), torch.ones(n, 5)
    t5_e, clip_e = torch.full((1, 3, 2), -1.0), torch.full((1, 5), -1.0)
    t5_d, clip_d = fm.drop_conditioning(t5, clip, t5_e, clip_e, p=0.1)
    dropped_t5 = (t5_d == -1).all(dim=(1, 2))
    dropped_clip = (clip_d == -1).all(dim=1)
    assert torch.equal(dropped_t5, dropped_clip)
    assert ((t5_d == 1).all(dim=(1, 2)) | dropped_t5).all()
    assert 0.08 < dropped_t5.float().mean().item() < 0.12


def test_timesteps_uniform_in_unit_interval():
    torch.manual_seed(2)
    t = fm.sample_timesteps(10000)
    assert t.min() >= 0 and t.max() < 1
    assert abs(t.mean().item() - 0.5) < 0.02
    assert torch.equal(fm.eval_timesteps(torch.tensor([0, 4, 7])), torch.tensor([0.0, 0.5, 0.875]))


def test_interpolation_and_target():
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0.0, 0.25, 1.0])
    xt = fm.add_noise(x0, noise, t)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[1], 0.75 * x0[1] + 0.25 * noise[1])
    torch.testing.assert_close(xt[2], noise[2])
    torch.testing.assert_close(fm.velocity_target(x0, noise), noise - x0)


def test_losses_are_fp32():
    pred = torch.randn(2, 3, 4, dtype=torch.bfloat16)
    target = torch.randn(2, 3, 4, dtype=torch.bfloat16)
    loss = fm.mse_loss(pred, target)
    assert loss.dtype == torch.float32
    per = fm.per_sample_mse(pred, target)
    assert per.shape == (2,) and per.dtype == torch.float32
    torch.testing.assert_close(per.mean(), loss)
    expected = ((pred.float() - target.float()) ** 2)[1].mean()
    torch.testing.assert_close(per[1], expected)


def _batch(b=4, t5_len=5, t5_dim=6, clip_dim=7, c=4, s=4):
    return {
        "t5": torch.randn(b, t5_len, t5_dim).bfloat16(),
        "clip": torch.randn(b, clip_dim).bfloat16(),
        "mean": torch.randn(b, c, s, s).bfloat16(),
        "logvar": torch.full((b, c, s, s), -20.0).bfloat16(),  # ~deterministic posterior
        "timestep": torch.tensor([0, 1, 4, 7]),
    }


def test_eval_inputs_reconstruct_reference_formula():
    batch = _batch()
    torch.manual_seed(3)
    inp = fm.eval_inputs(batch, torch.float32)
    assert inp.img.shape == (4, 4, 16) and inp.target.shape == (4, 4, 16)
    torch.testing.assert_close(inp.timesteps, torch.tensor([0.0, 0.125, 0.5, 0.875]))
    x0 = (batch["mean"].float() - 0.1159) * 0.3611
    x0_packed = fm.pack_latents(x0)
    noise = inp.target + x0_packed  # target = noise - x0
    t = inp.timesteps[:, None, None]
    torch.testing.assert_close(inp.img, (1 - t) * x0_packed + t * noise, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(inp.txt, batch["t5"].float())  # no dropout at eval
    assert torch.equal(inp.img_ids[0, 3], torch.tensor([0.0, 1.0, 1.0]))
    assert inp.txt_ids.shape == (4, 5, 3)


def test_training_inputs_drop_with_probability_one_and_dtype():
    batch = _batch()
    empty = (torch.zeros(1, 5, 6).bfloat16(), torch.zeros(1, 7).bfloat16())
    inp = fm.training_inputs(batch, empty, torch.bfloat16, p_drop=1.0)
    assert inp.img.dtype == torch.bfloat16 and inp.target.dtype == torch.bfloat16
    assert torch.count_nonzero(inp.txt) == 0 and torch.count_nonzero(inp.y) == 0
    assert ((inp.timesteps >= 0) & (inp.timesteps < 1)).all()
    kept = fm.training_inputs(batch, empty, torch.bfloat16, p_drop=0.0)
    assert torch.equal(kept.txt, batch["t5"]) and torch.equal(kept.y, batch["clip"])
