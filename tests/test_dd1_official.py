"""dd.dd1.load_official: the released DD1 files (LlamaGen-DD `{"ema", "model", ...}`, VAR-DD
`{"trainer": {"ema_parameters", "var_wo_ddp"}, ...}`) load strictly into DD1Model, with clear errors otherwise."""
import pytest
import torch

from dd import dd1
from dd.io import save_tensors

from test_dd1 import PNS, student, tiny_gpt, tiny_var


def _release_file(tmp_path, family, ema_sd, raw_sd, drop_buffers=False):
    if drop_buffers:  # a file that keeps parameters only
        ema_sd = {k: v for k, v in ema_sd.items() if k.split(".")[-1] not in ("lvl_1L", "attn_bias_for_masking")}
    path = tmp_path / f"{family}-dd.pt"
    obj = {"ema": ema_sd, "model": raw_sd, "steps": 10} if family == "llamagen" else \
        {"trainer": {"ema_parameters": ema_sd, "var_wo_ddp": raw_sd, "epoch": 3}, "args": {"depth": 2}}
    torch.save(obj, path)
    return path


def _models(family):
    teacher = tiny_gpt() if family == "llamagen" else tiny_var()[1]
    return student(teacher, seed=1), student(teacher, seed=2)


def _kw(family):
    return {"grid_size": 3, "n_head": 2} if family == "llamagen" else {"patch_nums": PNS}


@pytest.mark.parametrize("family", ["llamagen", "var"])
@pytest.mark.parametrize("drop_buffers", [False, True])
def test_release_layout_loads_the_ema_or_the_raw_weights(tmp_path, family, drop_buffers):
    ema, raw = _models(family)
    path = _release_file(tmp_path, family, ema.state_dict(), raw.state_dict(), drop_buffers)
    for want, use_ema in ((ema, True), (raw, False)):
        got = dd1.load_official(path, family, ema=use_ema, **_kw(family))
        assert got.config == want.config
        assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values()))
        x, y = torch.randn(2, want.L, want.D), torch.tensor([0, 2])
        for t in (0, 1):
            assert all(torch.equal(a, b) for a, b in zip(got(x, y, t), want(x, y, t)))
    flat = tmp_path / "flat.safetensors"  # a raw state dict (a user's conversion) is read as it is
    save_tensors(flat, {k: v.contiguous() for k, v in ema.state_dict().items()})
    assert dd1.load_official(flat, family, **_kw(family)).config == ema.config


def test_wrong_family_teacher_file_and_missing_key_say_so(tmp_path):
    ema, raw = _models("var")
    path = _release_file(tmp_path, "var", ema.state_dict(), raw.state_dict())
    with pytest.raises(ValueError, match="a var DD1 checkpoint, but it was given as family 'llamagen'"):
        dd1.load_official(path, "llamagen")
    teacher = tmp_path / "teacher.pt"
    torch.save({"model": tiny_gpt().state_dict()}, teacher)
    with pytest.raises(ValueError, match="a LlamaGen teacher checkpoint, not a DD1 model"):
        dd1.load_official(teacher, "llamagen", ema=False)
    sd = ema.state_dict()
    sd.pop("final_layer_conti.linear.bias")
    broken = _release_file(tmp_path, "var", sd, sd)
    with pytest.raises(ValueError, match=r"missing: 1 \['final_layer_conti.linear.bias'\]"):
        dd1.load_official(broken, "var", patch_nums=PNS)
    with pytest.raises(ValueError, match="pos_1LC has 22 rows but patch_nums"):
        dd1.load_official(path, "var")  # the release's patch_nums do not fit this file
    with pytest.raises(ValueError, match=r"no 'trainer' entry in checkpoint \(keys there: \['model'\]\)"):
        torch.save({"model": ema.state_dict()}, tmp_path / "no_ema.pt")
        dd1.load_official(tmp_path / "no_ema.pt", "var")


def _fixture(family, tmp_path):
    from safetensors.torch import load_file

    from test_llamagen import FIXTURES

    ref = load_file(FIXTURES / f"dd1_{family}_ref.safetensors")
    sd = {k[len("model."):]: v for k, v in ref.items() if k.startswith("model.")}
    path = _release_file(tmp_path, family, sd, sd)
    return {k[len("ref."):]: v for k, v in ref.items() if k.startswith("ref.")}, path


@pytest.mark.parametrize("family", ["llamagen", "var"])
def test_forward_and_few_step_sampling_match_the_release(tmp_path, family):
    """Parity with the release's inference code (fixtures from tests/fixtures/dd1_make_reference.py): a tiny
    random-weight DD1 model in the release layout gives the release's logits and continuous-head outputs at two
    trajectory points, and its 1-step and 2-step samples (argmax codes before the split, the continuous head after
    it, unsnapped), to 1e-5."""
    ref, path = _fixture(family, tmp_path)
    cfg = ref["config"].tolist()
    if family == "llamagen":
        grid, split, t2 = cfg[0], cfg[7], cfg[8]
        model = dd1.load_official(path, family, grid_size=grid, n_head=2)
    else:
        split, t2 = cfg[-2], cfg[-1]
        model = dd1.load_official(path, family, patch_nums=cfg[:3])
    labels, noise, cb = ref["labels"], ref["noise"], ref["codebook"]
    with torch.no_grad():
        for t in (0, t2):
            logits, cont = model(ref[f"x_t{t}"], labels, t)
            torch.testing.assert_close(logits, ref[f"logits_t{t}"], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cont, ref[f"cont_t{t}"], atol=1e-5, rtol=1e-5)
        for name, t_list in (("1step", [0]), ("2step", [0, t2])):
            _, x = dd1.sample(model, noise, labels, cb, model.ends, t_list=t_list, split=split)
            torch.testing.assert_close(x, ref[f"sample_{name}"], atol=1e-5, rtol=1e-5)
