"""Bad inputs raise ValueError with a message that names the problem."""

import re

import pytest
import torch

from megatron_cegppo.losses import POLICY_LOSSES, cegppo_loss, cispo_loss, gspo_loss, ppo_clip_loss


def inputs(batch=2, length=3):
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(batch, length, generator=g)
    old = lp + 0.1 * torch.randn(batch, length, generator=g)
    adv = torch.randn(batch, length, generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    return lp, old, adv, mask


ALL = sorted(POLICY_LOSSES)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("which", [1, 2, 3])
def test_shape_mismatch_names_argument_and_shapes(name, which):
    args = list(inputs())
    args[which] = args[which][:, :2]
    arg_name = ["log_prob", "old_log_prob", "advantages", "response_mask"][which]
    with pytest.raises(ValueError, match=rf"{arg_name} has shape \(2, 2\) but log_prob has shape \(2, 3\)"):
        POLICY_LOSSES[name](*args)


@pytest.mark.parametrize("name", ALL)
def test_inputs_must_be_2d(name):
    lp, old, adv, mask = inputs()
    with pytest.raises(ValueError, match=r"log_prob must be 2-D .*\(6,\)"):
        POLICY_LOSSES[name](lp.reshape(-1), old.reshape(-1), adv.reshape(-1), mask.reshape(-1))
    with pytest.raises(ValueError, match=r"response_mask must be 2-D .*\(1, 2, 3\)"):
        POLICY_LOSSES[name](lp, old, adv, mask[None])


def test_entropy_shape_checked():
    lp, old, adv, mask = inputs()
    with pytest.raises(ValueError, match=r"entropy has shape \(2, 4\)"):
        cegppo_loss(lp, old, adv, mask, entropy=torch.zeros(2, 4))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_at_valid_positions(name, which, bad):
    args = list(inputs())
    arg_name = ["log_prob", "old_log_prob", "advantages"][which]
    args[which] = args[which].clone()
    args[which][0, 1] = bad
    args[which][1, 2] = bad
    with pytest.raises(ValueError, match=rf"^{arg_name} has 2 non-finite"):
        POLICY_LOSSES[name](*args)
    # ignored where masked, or when the check is switched off
    args[3] = args[3].clone()
    args[3][0, 1] = False
    args[3][1, 2] = False
    loss, _ = POLICY_LOSSES[name](*args)
    assert torch.isfinite(loss)
    POLICY_LOSSES[name](*inputs()[:3], inputs()[3], check_finite=False)
    args[3] = torch.ones(2, 3)
    POLICY_LOSSES[name](*args, check_finite=False)  # no raise; result is the caller's problem


@pytest.mark.parametrize("c", [1.0, 0.5, -3.0, float("nan"), float("inf")])
def test_clip_ratio_c_must_exceed_one(c):
    with pytest.raises(ValueError, match="clip_ratio_c must be a finite number > 1"):
        cegppo_loss(*inputs(), clip_ratio_c=c)
    with pytest.raises(ValueError, match="clip_ratio_c must be a finite number > 1"):
        ppo_clip_loss(*inputs(), clip_ratio_c=c)


def test_clip_ratio_c_none_only_where_optional():
    ppo_clip_loss(*inputs(), clip_ratio_c=None)
    with pytest.raises(ValueError, match="clip_ratio_c must be a number > 1, got None"):
        cegppo_loss(*inputs(), clip_ratio_c=None)


@pytest.mark.parametrize("param", ["beta1", "beta2"])
@pytest.mark.parametrize("value", [-0.1, float("nan")])
def test_negative_beta(param, value):
    with pytest.raises(ValueError, match=rf"{param} must be a finite number >= 0"):
        cegppo_loss(*inputs(), **{param: value})


@pytest.mark.parametrize("name", ["cegppo", "ppo", "cispo", "gspo"])
@pytest.mark.parametrize("value", [-0.01, 1.0, 1.5])
def test_eps_low_range(name, value):
    with pytest.raises(ValueError, match=r"eps_low must be in \[0, 1\)"):
        POLICY_LOSSES[name](*inputs(), eps_low=value)


@pytest.mark.parametrize("name", ALL)
def test_eps_high_nonnegative(name):
    with pytest.raises(ValueError, match="eps_high must be a finite number >= 0"):
        POLICY_LOSSES[name](*inputs(), eps_high=-0.2)


def test_eps_low_none_only_for_cispo():
    cispo_loss(*inputs(), eps_low=None)
    for fn in (cegppo_loss, ppo_clip_loss, gspo_loss):
        with pytest.raises(ValueError, match="eps_low must be a number, got None"):
            fn(*inputs(), eps_low=None)


@pytest.mark.parametrize("name", ALL)
def test_unknown_loss_agg_mode_lists_valid_modes(name):
    msg = re.escape(
        "unknown loss_agg_mode 'seq-mean'; valid modes: token-mean, seq-mean-token-sum, "
        "seq-mean-token-mean, seq-mean-token-sum-norm"
    )
    with pytest.raises(ValueError, match=msg):
        POLICY_LOSSES[name](*inputs(), loss_agg_mode="seq-mean")


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("norm", [0, -1.0, float("nan"), torch.tensor(0.0), torch.tensor(-2.0)])
def test_normalizer_must_be_positive(name, norm):
    with pytest.raises(ValueError, match="normalizer must be a finite number > 0"):
        POLICY_LOSSES[name](*inputs(), normalizer=norm)


def test_normalizer_must_be_scalar():
    with pytest.raises(ValueError, match=r"normalizer must be a number or a 0-dim tensor"):
        cegppo_loss(*inputs(), normalizer=torch.ones(2))
    with pytest.raises(ValueError, match=r"normalizer must be a number or a 0-dim tensor"):
        cegppo_loss(*inputs(), normalizer="3")


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5])
def test_hp_threshold_is_a_probability(value):
    with pytest.raises(ValueError, match=r"hp_threshold must be a probability in \(0, 1\]"):
        cegppo_loss(*inputs(), hp_threshold=value)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64, torch.uint8, torch.bool])
def test_mask_of_any_dtype(name, dtype):
    lp, old, adv, _ = inputs()
    mask01 = torch.tensor([[1, 0, 1], [0, 0, 1]])
    ref, _ = POLICY_LOSSES[name](lp, old, adv, mask01.bool())
    got, m = POLICY_LOSSES[name](lp, old, adv, mask01.to(dtype))
    assert torch.equal(got, ref)
    assert m["num_tokens"].item() == 3


def test_non_tensor_input_is_type_error():
    lp, old, adv, mask = inputs()
    with pytest.raises(TypeError, match="advantages must be a torch.Tensor"):
        cegppo_loss(lp, old, adv.tolist(), mask)


def test_integer_log_prob_rejected():
    lp, old, adv, mask = inputs()
    with pytest.raises(ValueError, match="old_log_prob must be a floating-point tensor"):
        cegppo_loss(lp, old.long(), adv, mask)
