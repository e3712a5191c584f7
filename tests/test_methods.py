"""Method pieces against their definitions: loss closed forms, gradients, ratio networks, init, registry."""

from types import SimpleNamespace

import pytest
import torch

from probe.core.edm import karras_sigmas
from probe.core.errors import UserError
from probe.core.models import build_unet, load_model
from train.init import initialise_generator
from train.student.losses import (
    classifier_accuracy,
    h_weight,
    karras_sigma_from_u,
    logistic_ratio_loss,
    sample_student_sigmas,
    sigma_weight,
    surrogate_loss,
)
from train.student.methods import METHODS, get_method
from train.student.methods.sid import sid_loss_per_sample
from train.student.ratio_net import UNetInput, build_ratio_net, clone_denoiser, load_ratio_net, save_ratio_net


def _cfg(**kw):
    base = dict(ratio_net="encoder", cnn_width=8, sigma_dist="lognormal", p_mean=-1.2, p_std=1.2,
                sigma_min=0.002, sigma_max=80.0, weighting="none", fkl_clip=10.0, sid_alpha=1.2)
    return SimpleNamespace(**{**base, **kw})


# ------------------------------------------------------------------------------ losses
def test_logistic_loss_is_minimised_by_the_log_density_ratio():
    # Two categorical distributions; a free logit per category trained on samples must converge
    # to log p_fake / p_real (the Bayes-optimal logit with balanced classes).
    g = torch.Generator().manual_seed(0)
    p_fake, p_real = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.3, 0.5])
    fake = torch.multinomial(p_fake, 40_000, replacement=True, generator=g)
    real = torch.multinomial(p_real, 40_000, replacement=True, generator=g)
    logit = torch.zeros(3, requires_grad=True)
    opt = torch.optim.LBFGS([logit], max_iter=100)

    def closure():
        opt.zero_grad()
        loss = logistic_ratio_loss(logit[fake], logit[real])
        loss.backward()
        return loss

    opt.step(closure)
    empirical = torch.bincount(fake, minlength=3).float() / torch.bincount(real, minlength=3).float()
    assert torch.allclose(logit.detach(), empirical.log(), atol=1e-3)
    assert torch.allclose(logit.detach(), (p_fake / p_real).log(), atol=0.05)


def test_h_weights_and_accuracy():
    l = torch.tensor([-30.0, -1.0, 0.0, 2.0], requires_grad=True)
    assert torch.equal(h_weight(l, "kl"), torch.ones(4))
    assert torch.allclose(h_weight(l, "js"), 1 / (1 + l.detach().exp()))
    assert torch.allclose(h_weight(l, "fkl", fkl_clip=10.0), torch.exp(-l.detach()).clamp(max=10.0))
    assert not h_weight(l, "js").requires_grad  # used under stop-gradient
    with pytest.raises(UserError):
        h_weight(l, "tv")
    acc_real, acc_fake = classifier_accuracy(torch.tensor([1.0, -1.0]), torch.tensor([-1.0, -2.0, 3.0, -0.5]))
    assert (acc_real, acc_fake) == (0.75, 0.5)


def test_sigma_weights_and_samplers():
    s = torch.tensor([0.1, 0.5, 2.0])
    assert torch.equal(sigma_weight(s, "none"), torch.ones(3))
    assert torch.allclose(sigma_weight(s, "sigma2"), s ** 2 / 0.25)
    assert torch.allclose(sigma_weight(s, "snr"), 0.25 / s ** 2)
    assert torch.allclose(sigma_weight(s, "edm"), (s ** 2 + 0.25) / (0.5 * s) ** 2)
    g = torch.Generator().manual_seed(0)
    ln = sample_student_sigmas(20_000, g, "lognormal", -1.2, 1.2, 0.002, 80.0)
    assert abs(float(ln.log().mean()) + 1.2) < 0.05 and abs(float(ln.log().std()) - 1.2) < 0.05
    kr = sample_student_sigmas(5000, g, "karras", sigma_min=0.01, sigma_max=5.0)
    assert float(kr.min()) >= 0.01 - 1e-6 and float(kr.max()) <= 5.0 + 1e-5
    # the grid positions u = i / (N - 1) are exactly EDM's sampling steps
    grid = karras_sigmas(18, 0.002, 80.0)[:-1]
    assert torch.allclose(karras_sigma_from_u(torch.linspace(0, 1, 18, dtype=torch.float64), 0.002, 80.0), grid)


def test_surrogate_loss_gradient_is_the_given_gradient():
    x = torch.randn(3, 1, 4, 4, requires_grad=True)
    grad = torch.randn(3, 1, 4, 4)
    surrogate_loss(x, grad).backward()
    assert torch.allclose(x.grad, grad / x.numel())


def test_sid_loss_matches_the_papers_expanded_form():
    d_t, d_f, x = torch.randn(3, 5, 2, 2, 2).unbind(0)
    alpha = 1.2
    diff = (d_t - d_f).flatten(1)
    expanded = ((1 - alpha) * (diff ** 2).sum(1) + (diff * (d_f - x).flatten(1)).sum(1)) / diff.shape[1]
    assert torch.allclose(sid_loss_per_sample(d_t, d_f, x, alpha), expanded, atol=1e-6)


# ---------------------------------------------------------------------- ratio networks
def test_unet_input_reproduces_what_the_denoiser_feeds_its_unet(tiny_teacher, tmp_path):
    edm = load_model(tiny_teacher).denoiser
    torch.manual_seed(0)
    bare = build_unet(8, 1, "test")
    bare.save_pretrained(tmp_path / "ddpm")
    ddpm = load_model(tmp_path / "ddpm").denoiser
    x, sigma = torch.randn(4, 1, 8, 8), torch.tensor([0.01, 0.3, 2.5, 40.0])
    for den in (edm, ddpm):
        seen = {}
        h = den.unet.register_forward_pre_hook(lambda m, args, seen=seen: seen.update(sample=args[0], t=args[1]))
        den(x, sigma)
        h.remove()
        sample, t = UNetInput.like(den)(x, sigma)
        assert torch.allclose(sample, seen["sample"]) and torch.allclose(t, seen["t"]), den.parameterisation


def test_encoder_ratio_net_is_the_teachers_encoder(tiny_teacher):
    teacher = load_model(tiny_teacher).denoiser
    torch.manual_seed(0)
    net = build_ratio_net("encoder", teacher)
    t_sd, e_sd = teacher.unet.state_dict(), net.body.state_dict()
    assert e_sd and all(torch.equal(v, t_sd[k]) for k, v in e_sd.items())
    # its body output is the teacher UNet's mid-block output on the same input
    seen = {}
    h = teacher.unet.mid_block.register_forward_hook(lambda m, a, out: seen.update(mid=out))
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 5.0])
    teacher(x, sigma)
    h.remove()
    assert torch.allclose(net.body(*net.inputs(x, sigma)), seen["mid"], atol=1e-6)
    assert torch.equal(net(x, sigma), torch.zeros(3))  # zero-initialised head: ratio 1 to start
    rand = build_ratio_net("encoder-random", teacher)
    assert not torch.equal(rand.body.conv_in.weight, teacher.unet.conv_in.weight)


@pytest.mark.parametrize("kind", ["encoder", "cnn"])
def test_ratio_net_save_load_round_trip(tiny_teacher, tmp_path, kind):
    torch.manual_seed(0)
    net = build_ratio_net(kind, load_model(tiny_teacher).denoiser, cnn_width=8)
    torch.nn.init.normal_(net.head.linear.weight)
    save_ratio_net(net, tmp_path / "ratio")
    back = load_ratio_net(tmp_path / "ratio")
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.2, 3.0])
    assert torch.allclose(net(x, sigma), back(x, sigma), atol=1e-6)
    with pytest.raises(UserError):
        load_ratio_net(tmp_path)


def test_classifier_separates_real_digits_from_constant_images(tiny_teacher):
    from probe.core.data import load_dataset

    teacher = load_model(tiny_teacher)
    torch.manual_seed(0)
    method = get_method("diffratio-js")(_cfg(sigma_max=0.5), teacher.denoiser, None)
    opt = torch.optim.Adam(method.aux.parameters(), lr=3e-3)
    real_all = load_dataset("digits", "train").images
    g = torch.Generator().manual_seed(0)
    fake = torch.zeros(32, 1, 8, 8)  # mid-grey images: clearly not digits
    for _ in range(40):
        loss, stats = method.aux_loss(fake, real_all[torch.randint(len(real_all), (32,), generator=g)], g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, stats = method.aux_loss(fake, real_all[:32], g)
    assert stats["acc_real"] > 0.9 and stats["acc_fake"] > 0.9, stats


# ------------------------------------------------------------------ generator gradients
def test_diffratio_gradient_is_h_times_the_logit_gradient(tiny_teacher):
    teacher = load_model(tiny_teacher).denoiser
    torch.manual_seed(0)
    for name in ("diffratio-kl", "diffratio-js", "diffratio-fkl"):
        method = get_method(name)(_cfg(), teacher, None)
        torch.nn.init.normal_(method.aux.head.linear.weight, std=3.0)
        method.aux.requires_grad_(False)
        fake = torch.randn(4, 1, 8, 8, requires_grad=True)
        g = torch.Generator().manual_seed(1)
        state = g.get_state()
        method.generator_loss(fake, g)[0].backward()
        # recompute by hand with the same draws
        g.set_state(state)
        x = fake.detach().clone().requires_grad_(True)
        logit, _ = method.fake_logits(x, g)
        logit.sum().backward()
        h = {"diffratio-kl": torch.ones(4), "diffratio-js": torch.sigmoid(-logit.detach()),
             "diffratio-fkl": torch.exp(-logit.detach()).clamp(max=10.0)}[name]
        assert torch.allclose(fake.grad, h.view(-1, 1, 1, 1) * x.grad / 4, atol=1e-6), name


def test_vsd_gradient_is_the_normalised_denoiser_difference(tiny_teacher):
    teacher = load_model(tiny_teacher).denoiser
    method = get_method("vsd")(_cfg(), teacher, None)
    with torch.no_grad():  # make the fake score differ from the teacher
        for p in method.aux.parameters():
            p.add_(0.05 * torch.randn_like(p))
    method.aux.requires_grad_(False)
    fake = torch.randn(3, 1, 8, 8, requires_grad=True)
    g = torch.Generator().manual_seed(2)
    state = g.get_state()
    method.generator_loss(fake, g)[0].backward()
    g.set_state(state)
    with torch.no_grad():
        x_s, sigma = method.noised(fake.detach(), g)
        d_t, d_f = teacher(x_s, sigma), method.aux(x_s, sigma)
        norm = (fake.detach() - d_t).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    assert torch.allclose(fake.grad, (d_f - d_t) / norm / fake.numel(), atol=1e-7)


# --------------------------------------------------------------------- registry, init
def test_registry_and_method_facts():
    assert set(METHODS) == {"diffratio-js", "diffratio-kl", "diffratio-fkl", "vsd", "sid", "gan"}
    for name in ("diffratio-js", "diffratio-kl", "diffratio-fkl", "gan"):
        assert not METHODS[name].uses_teacher and METHODS[name].uses_data
    for name in ("vsd", "sid"):
        assert METHODS[name].uses_teacher and not METHODS[name].uses_data
    with pytest.raises(UserError, match="unknown method"):
        get_method("dmd")


@pytest.mark.parametrize("method", ["diffratio-js", "vsd"])
def test_teacher_is_released_after_set_up_unless_the_method_uses_it(tiny_teacher, tmp_path, monkeypatch, method):
    # Weak references to the teacher denoiser and to every one of its tensors, taken as the loop loads
    # it; checked inside the first training step after a gc pass. Dead references mean no object of
    # the training state (generator, ratio net, optimisers, EMA, loop locals) holds a teacher tensor.
    import gc
    import weakref

    import train.student.loop as loop

    refs, seen = {}, {}

    def spy_load(path, device="cpu"):
        model = load_model(path, device)
        refs["denoiser"] = weakref.ref(model.denoiser)
        refs["tensors"] = [weakref.ref(t) for t in (*model.denoiser.parameters(), *model.denoiser.buffers())]
        return model

    class Spy(get_method(method)):
        def aux_loss(self, fake, real, rng):
            if not seen:
                gc.collect()
                seen["denoiser"] = refs["denoiser"]() is not None
                seen["tensors"] = sum(r() is not None for r in refs["tensors"])
            return super().aux_loss(fake, real, rng)

    monkeypatch.setattr(loop, "load_model", spy_load)
    monkeypatch.setattr(loop, "get_method", lambda name: Spy)
    loop.train_student(loop.StudentConfig(out=str(tmp_path / "run"), teacher=str(tiny_teacher), method=method,
                                          steps=1, batch=4, checkpoint_every=10), progress=False)
    n = len(refs["tensors"])
    assert n > 0
    if Spy.uses_teacher:
        assert seen == {"denoiser": True, "tensors": n}   # vsd evaluates it every step
    else:
        assert seen == {"denoiser": False, "tensors": 0}  # diffratio: not one teacher tensor left


def test_initialise_generator(tiny_teacher):
    teacher = load_model(tiny_teacher)
    copy, report = initialise_generator("teacher", teacher, seed=0)
    assert all(torch.equal(v, teacher.unet.state_dict()[k]) for k, v in copy.unet.state_dict().items())
    assert copy.unet is not teacher.unet and all(p.requires_grad for p in copy.parameters())
    assert report["tensors_copied"] == len(teacher.unet.state_dict()) and report["tensors_reinitialised"] == 0
    a, _ = initialise_generator("random", teacher, seed=3)
    b, rep = initialise_generator("random", teacher, seed=3)
    c, _ = initialise_generator("random", teacher, seed=4)
    assert torch.equal(a.unet.conv_in.weight, b.unet.conv_in.weight)
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)
    assert not torch.equal(a.unet.conv_in.weight, teacher.unet.conv_in.weight)
    assert rep["tensors_copied"] == 0
    with pytest.raises(UserError, match="init spec"):
        initialise_generator("teacher-shuffled?", teacher, seed=0)


def test_clone_does_not_carry_instance_patches(tiny_teacher):
    teacher = load_model(tiny_teacher).denoiser

    def boom(*a, **k):
        raise RuntimeError("patched")

    teacher.unet.forward = boom
    clone = clone_denoiser(teacher)
    assert clone(torch.zeros(1, 1, 8, 8), 1.0).shape == (1, 1, 8, 8)
    assert clone.parameterisation == "edm" and clone.unet is not teacher.unet
