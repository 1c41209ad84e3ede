"""The distillation forward and loss on the tiny random-weight checkpoint: nothing pruned ->
teacher and student logits bit-equal and the KD loss and its gradients exactly 0; answer
logits aligned token for token in left-padded batches of mixed sizes; the KL's hand-written
gradient; the loss averaged over every answer token of the global batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from distill_testlib import SIZES, screenshot
from PIL import Image

from pixelprune.distill.batch import IGNORE, Collator, TrainItem, text_answer_ids
from pixelprune.distill.data import DistillSample
from pixelprune.distill.model import DistillModel, answer_terms, token_kl
from pixelprune.distill.plan import TrainPlan
from pixelprune.distill.train import build_model, load_model
from pixelprune.model.adapter import PrunedQwen3VL
from pixelprune.model.processor import load_processor
from pixelprune.settings import PruneSettings

ANSWERS = ('{"point_2d": [781, 844]}', "(12, 3)", '{"point_2d": [5, 999]}')  # three answer lengths


def _plan(method: str) -> TrainPlan:
    return TrainPlan(method=method, lora_rank=4, alpha=0.0, temperature=1.0, max_steps=1, lr=1e-5, warmup_steps=0,
                     batch_size=3, grad_accum=1, save_steps=1, seed=0, answer_tokens=8, gradient_checkpointing=True,
                     deepspeed=None, fsdp=None)


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return load_processor(str(tiny_checkpoint))


@pytest.fixture(scope="module")
def items(tmp_path_factory, processor):
    """Three rows on screenshots of three sizes, answers of three lengths."""
    folder = tmp_path_factory.mktemp("distill-loss")
    rows = []
    for index, (size, answer) in enumerate(zip(SIZES, ANSWERS)):
        path = folder / f"shot{index}.png"
        Image.fromarray(screenshot(size, index)).save(path)
        sample = DistillSample(f"s{index}", path, f"instruction number {index}" + " long" * index)
        rows.append(TrainItem(sample, text_answer_ids(processor, answer)))
    return rows


def _model(tiny_checkpoint, method: str) -> DistillModel:
    model = build_model(load_model(str(tiny_checkpoint), torch.device("cpu"), torch.float32), _plan(method))
    return model.train()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_nothing_pruned_gives_a_kd_loss_and_gradients_of_exactly_zero(tiny_checkpoint, processor, items, method):
    model = _model(tiny_checkpoint, method)
    batch = Collator(processor, PruneSettings.OFF, 0)(items)
    out = model(**batch)
    assert out.kept_blocks.tolist() == out.total_blocks.tolist() == [64, 80, 72]
    assert torch.equal(out.student, out.teacher)
    terms = answer_terms(out)
    assert terms.kl_sum.item() == 0.0 and terms.agree.item() == terms.tokens.item() == sum(len(i.answer_ids) for i in items)
    terms.kl_sum.backward()
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for _, p in trained)
    nonzero = [name for name, p in trained if bool(p.grad.any())]
    assert nonzero == []
    # the same rows pruned: a KD loss, and gradients, that are not 0 (the check above can fail)
    model.zero_grad()
    pruned = model(**Collator(processor, PruneSettings(), 0)(items))
    assert pruned.kept_blocks.tolist() < pruned.total_blocks.tolist()
    kl = answer_terms(pruned).kl_sum
    kl.backward()
    assert kl.item() > 0 and sum(bool(p.grad.any()) for _, p in trained) >= len(trained) // 2  # LoRA: B, not A


def test_answer_logits_are_aligned_token_for_token_in_padded_batches(tiny_checkpoint, processor, items):
    model = _model(tiny_checkpoint, "full").eval()
    collator = Collator(processor, PruneSettings(), 0)
    batch = collator(items)
    lengths = [len(i.answer_ids) for i in items]
    assert len(set(lengths)) == 3 and len(set(batch["attention_mask"].sum(1).tolist())) == 3  # padded rows
    with torch.no_grad():
        out = model(**batch)
    width = max(lengths)
    assert out.labels.shape == (3, width) and out.student.shape[:2] == out.teacher.shape[:2] == (3, width)
    for row, item in enumerate(items):
        answer = torch.tensor(item.answer_ids)
        n = len(answer)
        assert torch.equal(out.labels[row, width - n:], answer) and bool((out.labels[row, :width - n] == IGNORE).all())
        assert torch.equal(out.student_ids[row, width - n:], answer)  # the pruned sequence ends with the answer
        assert torch.equal(out.teacher_ids[row, width - n:], answer)
        alone = collator.example(item)  # the row on its own: no padding, pruned by the adapter directly
        ids = alone.input_ids[None]
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=alone.mm_token_type_ids[None],
                      pixel_values=alone.pixel_values, image_grid_thw=torch.tensor([alone.grid]))
        with torch.no_grad():
            teacher = model.teacher(**kwargs, use_cache=False).logits[0, -n - 1:-1]
            student = PrunedQwen3VL(model.base)(**kwargs, keep=[alone.keep], use_cache=False).logits[0, -n - 1:-1]
        torch.testing.assert_close(out.teacher[row, width - n:], teacher, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out.student[row, width - n:], student, atol=2e-5, rtol=1e-4)
        assert not torch.allclose(student, teacher, atol=1e-3)  # pruning changed them: alignment is not trivial


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_token_kl_is_t2_times_kl_and_its_gradient_is_autograds(temperature):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(7, 11, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(7, 11, generator=generator, dtype=torch.float64)
    weights = torch.rand(7, generator=generator, dtype=torch.float64)
    kl = token_kl(student, teacher, temperature)
    (kl * weights).sum().backward()
    reference_student = student.detach().clone().requires_grad_(True)
    log_p, log_q = F.log_softmax(teacher / temperature, -1), F.log_softmax(reference_student / temperature, -1)
    reference = (log_p.exp() * (log_p - log_q)).sum(-1) * temperature ** 2
    (reference * weights).sum().backward()
    torch.testing.assert_close(kl, reference.detach())
    torch.testing.assert_close(student.grad, reference_student.grad)
    same = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    token_kl(same, same.detach().clone(), temperature).sum().backward()
    assert bool((same.grad == 0).all())


def test_loss_is_averaged_over_every_answer_token_of_the_global_batch(tiny_checkpoint, processor, items, tmp_path):
    from pixelprune.distill.train import make_trainer, training_arguments

    plan = TrainPlan(**{**_plan("full").__dict__, "alpha": 0.3, "batch_size": 1, "grad_accum": 2})
    collator = Collator(processor, PruneSettings(), 0)
    model = _model(tiny_checkpoint, "full")
    trainer, _ = make_trainer(plan, training_arguments(plan, tmp_path, cuda=False), model, items, collator, print)
    small, large = collator(items[:1]), collator(items[1:])  # micro-batches with 25 and 10 + 23 answer tokens
    assert trainer.model_accepts_loss_kwargs
    total = trainer._get_num_items_in_batch([small, large], torch.device("cpu"))
    assert int(total) == sum(len(i.answer_ids) for i in items)

    def grads(batches, count):
        model.zero_grad()
        for batch in batches:
            trainer.compute_loss(model, batch, num_items_in_batch=count).backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])

    accumulated = grads([small, large], total)
    together = grads([collator(items)], total)
    torch.testing.assert_close(accumulated, together, atol=1e-6, rtol=1e-4)
    per_batch_means = grads([small], small["labels"].ne(IGNORE).sum()) + grads([large], large["labels"].ne(IGNORE).sum())
    assert not torch.allclose(per_batch_means / 2, together, atol=1e-6, rtol=1e-3)  # the wrong normalisation differs
    out = model(**collator(items))
    terms = answer_terms(out)
    expected = (0.3 * terms.ce_sum + 0.7 * terms.kl_sum) / total
    torch.testing.assert_close(trainer.compute_loss(model, collator(items), num_items_in_batch=total), expected)
    assert np.isclose(float(terms.ce_sum.detach() / total), float(F.cross_entropy(
        out.student.detach()[out.labels != IGNORE], out.labels[out.labels != IGNORE])))
