"""The fp16 extension of iaat.py: input gradients for PGD under torch.autocast(float16).

The core attacks of iaat.py (pgd_attack, pgd_fooled, select_epsilon) run in fp32, or in bf16
under the caller's autocast, with iaat.input_grad. In fp16 the backward pass would flush
small input gradients to 0, and PGD's step sign(0) = 0 would not move the pixel; pass
grad_fn=fp16_input_grad to the attacks instead. iaat.train_step does so under --amp fp16, and
the ImageNet launcher (paper App E.2: FP16 attacks) switches it on by default.

    from iaat import pgd_attack
    from iaat_fp16 import fp16_input_grad
    with torch.autocast("cuda", dtype=torch.float16):
        x_adv = pgd_attack(model, x, y, eps, grad_fn=fp16_input_grad)

This module sits below iaat.py: it imports iaat_run only, and iaat.py imports it.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from iaat_run import current_dist

FP16_LOSS_SCALE = 2.0 ** 12  # an fp16 input gradient's largest logit gradient, at first


def fp16_input_grad(model, x_adv, y, targeted: bool = False, state=None):
    """input_grad under torch.autocast(dtype=float16), `state` being the loss scale
    (FP16_LOSS_SCALE at each attack's first step); outside fp16 autocast, input_grad itself.

    In fp16 the backward pass would flush small gradients to 0, and PGD's step sign(0) = 0
    would not move the pixel. So it starts from each sample's logit gradient scaled to a
    largest entry of `scale`: a positive factor per sample keeps the sign PGD uses, as samples
    are independent in eval mode; when train-mode BatchNorm couples them, one factor scales
    the batch (agreed over the processes under SyncBatchNorm). On overflow the backward pass
    is repeated at scale / 16, and the attack keeps that scale."""
    if not (torch.is_autocast_enabled(x_adv.device.type)
            and torch.get_autocast_dtype(x_adv.device.type) == torch.float16):
        return _plain_input_grad(model, x_adv, y, targeted, state)  # bf16 has fp32's range
    scale = FP16_LOSS_SCALE if state is None else state
    coupled = _couples_samples(model)
    synced = coupled and _syncs_processes(model)
    with torch.enable_grad():
        x_adv = x_adv.detach().requires_grad_(True)
        logits = model(x_adv)
        while True:
            g = _scaled_logit_grad(logits, y, targeted, scale, not coupled, synced)
            grad, = torch.autograd.grad(logits, x_adv, grad_outputs=g, retain_graph=scale > 1)
            ok = torch.isfinite(grad).all().float().view(1)
            if synced:  # every process retries together
                torch.distributed.all_reduce(ok, torch.distributed.ReduceOp.MIN)
            if scale <= 1 or bool(ok):
                return logits.detach(), grad, scale
            scale /= 16


def _plain_input_grad(model, x_adv, y, targeted: bool, state):
    """iaat.input_grad, written out here so that this module does not import iaat (a test
    checks that the two agree bit for bit)."""
    with torch.enable_grad():
        x_adv = x_adv.detach().requires_grad_(True)
        logits = model(x_adv)
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        grad, = torch.autograd.grad(-loss if targeted else loss, x_adv)
        return logits.detach(), grad, state


def _couples_samples(model: nn.Module) -> bool:
    """Does one sample's output depend on the others' (BatchNorm using batch statistics)?"""
    return any(m.training or not m.track_running_stats for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))


def _syncs_processes(model: nn.Module) -> bool:
    """Does a train-mode SyncBatchNorm couple this process's batch with the others'?"""
    return current_dist().world > 1 and any(
        isinstance(m, nn.SyncBatchNorm) and m.training for m in model.modules())


def _scaled_logit_grad(logits, y, targeted: bool, scale: float, per_sample: bool, synced: bool):
    """d(cross-entropy)/d(logits) in float64, divided by its largest entry per sample (or per
    batch, or global batch under SyncBatchNorm), times `scale`: every sample's largest logit
    gradient becomes `scale`, however confident it is (a margin of 40 gives e^-40)."""
    with torch.no_grad():
        p = logits.double().softmax(1)
        rest = p.sum(1, keepdim=True) - p.gather(1, y[:, None])  # 1 - p_y, without cancelling
        dz = p.scatter(1, y[:, None], -rest) * (-1 if targeted else 1)
        peak = dz.abs().amax(1, keepdim=True) if per_sample else dz.abs().amax().view(1, 1)
        if synced:
            peak = peak.float()
            torch.distributed.all_reduce(peak, torch.distributed.ReduceOp.MAX)
            peak = peak.double()
        g = torch.where(peak > 0, dz / peak.clamp(min=1e-300), torch.zeros_like(dz)) * scale
        return g.to(logits.dtype)
