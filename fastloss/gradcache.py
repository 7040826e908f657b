"""GradCache: train a contrastive loss on a batch far larger than the encoder's activations fit in memory.

The driver never holds more than one mini-batch of encoder activations (Gao et al. 2021,
https://arxiv.org/abs/2101.06983):

1. embed every mini-batch of every column under ``no_grad``, capturing the RNG state (CPU and each used CUDA
   device) and the autocast state before each forward;
2. compute the loss over all embeddings and back-propagate it to the embeddings only, caching d loss / d embedding
   (O(B * D): with fastloss's fused losses the B x N score matrix is never materialised, so the loss stage needs
   no chunking);
3. when the returned loss is back-propagated, re-embed each mini-batch with gradients under its restored RNG and
   autocast state (dropout draws the same masks, so the replayed embeddings equal the first pass exactly) and
   back-propagate ``<embedding, cached grad> * grad_output`` (in fp32): a gradient scaler's factor or a gradient
   accumulation division reaches every mini-batch. Under ``DistributedDataParallel`` every replay but the last runs
   in ``no_sync()``, so the step costs one gradient all-reduce, not one per mini-batch.

Inputs are "columns": one mapping per input column (anchors, positives, negatives, ...) of batched, padded features
(``input_ids``, ``attention_mask``, ...; every tensor of rank >= 1 has the batch on dim 0). Mini-batches hold
``mini_batch_size`` rows or, with ``mini_batch_num_tokens``, as many rows as fit in that many non-padding tokens
(greedy; a longer row forms its own mini-batch). Trailing padding columns shared by a whole mini-batch are trimmed.

Entry points, from the simplest:

- :func:`gradcache_step`: one cached forward + backward, given an encoder, columns and a loss over embeddings.
- :func:`cached_loss`: the cached forward only; call ``.backward()`` on the result (or hand it to a scaler).
- :func:`cached_forward`: the same with a GradCache-style loss stage ``calculate_loss(reps, with_backward=...)``
  over per-mini-batch embeddings (the contract of sentence-transformers' Cached losses and ``MatryoshkaLoss``).

Nothing here needs sentence-transformers; ``tqdm`` is imported only for ``show_progress_bar=True``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

Features = Mapping[str, Any]
Encoder = Callable[[dict[str, Any]], Any]
CalculateLoss = Callable[..., Tensor]

_BATCH_KEYS = ("input_ids", "attention_mask")
# Batch metadata that sentence-transformers may store as one value ([1]) instead of one per row.
_METADATA_KEYS = ("prompt_length",)

__all__ = [
    "RNGState",
    "cached_forward",
    "cached_loss",
    "gradcache_step",
    "minibatch_ranges",
    "slice_minibatch",
    "validate_mini_batching",
]


class RNGState:
    """The CPU generator's state and that of each given CUDA device (and MPS, if asked) at construction time.

    Entering restores those states; exiting puts back the states found on entering, so a replay leaves the
    surrounding random stream untouched.
    """

    def __init__(self, cuda_devices: Iterable[int] = (), mps: bool = False) -> None:
        self.cuda_devices = tuple(sorted(set(cuda_devices)))
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(device) for device in self.cuda_devices]
        self.mps = torch.mps.get_rng_state() if mps else None

    def _swap(self, cpu: Tensor, cuda: Sequence[Tensor], mps: Tensor | None) -> None:
        torch.set_rng_state(cpu)
        for device, state in zip(self.cuda_devices, cuda):
            torch.cuda.set_rng_state(state, device)
        if mps is not None:
            torch.mps.set_rng_state(mps)

    def __enter__(self) -> RNGState:
        self._outer = RNGState(self.cuda_devices, mps=self.mps is not None)
        self._swap(self.cpu, self.cuda, self.mps)
        return self

    def __exit__(self, *exc_info: object) -> None:
        outer, self._outer = self._outer, None
        self._swap(outer.cpu, outer.cuda, outer.mps)


def _autocast_states(device_types: Iterable[str]) -> list[tuple[str, bool, torch.dtype]]:
    return [(t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in sorted(set(device_types))]


@contextlib.contextmanager
def _autocast(states: Sequence[tuple[str, bool, torch.dtype]]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for device_type, enabled, dtype in states:
            stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
        yield


def _column_batch_size(name: str, features: object) -> int:
    if not isinstance(features, Mapping):
        raise ValueError(f"{name} must be a mapping of feature name to batched tensor, got {type(features).__name__}")
    if "cu_seq_lens_q" in features:
        raise ValueError(
            f"{name} holds flattened inputs (cu_seq_lens_q); the GradCache driver takes padded batches "
            "([batch, seq_len] input_ids / attention_mask)"
        )
    batched = [
        (key, value)
        for key, value in features.items()
        if isinstance(value, Tensor) and value.ndim > 0 and key not in _METADATA_KEYS
    ]
    if not batched:
        raise ValueError(f"{name} holds no batched tensor; expected e.g. input_ids of shape [batch, seq_len]")
    key, value = next(((k, v) for k, v in batched if k in _BATCH_KEYS), batched[0])
    batch = value.shape[0]
    for other, tensor in batched:
        if tensor.shape[0] != batch:
            raise ValueError(
                f"{name}[{other!r}] has {tensor.shape[0]} rows but {name}[{key!r}] has {batch}; every batched tensor "
                "of a column must have the batch on dim 0"
            )
    if batch == 0:
        raise ValueError(f"{name} is an empty batch; expected at least one row")
    return batch


def validate_mini_batching(mini_batch_size: object, mini_batch_num_tokens: object) -> None:
    """ValueError unless ``mini_batch_size`` is an int >= 1 and ``mini_batch_num_tokens`` None or an int >= 1."""
    if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1:
        raise ValueError(f"mini_batch_size must be an integer >= 1, got {mini_batch_size!r}")
    if mini_batch_num_tokens is not None and (
        isinstance(mini_batch_num_tokens, bool)
        or not isinstance(mini_batch_num_tokens, int)
        or mini_batch_num_tokens < 1
    ):
        raise ValueError(f"mini_batch_num_tokens must be None or an integer >= 1, got {mini_batch_num_tokens!r}")


@dataclass(frozen=True)
class _ColumnPlan:
    ranges: list[tuple[int, int]]
    ends: list[int | None]  # per mini-batch: sequence width after trimming trailing padding (None: keep all)


def _plan_column(
    name: str, features: Features, batch: int, mini_batch_size: int, mini_batch_num_tokens: int | None
) -> _ColumnPlan:
    mask = features.get("attention_mask")
    if not (isinstance(mask, Tensor) and mask.ndim == 2):
        if mini_batch_num_tokens is not None:
            raise ValueError(
                f"mini_batch_num_tokens needs {name}['attention_mask'] of shape [batch, seq_len] to count tokens; "
                "use mini_batch_size instead"
            )
        ranges = [(b, min(b + mini_batch_size, batch)) for b in range(0, batch, mini_batch_size)]
        return _ColumnPlan(ranges, [None] * len(ranges))

    width = mask.shape[1]
    active = mask != 0
    positions = torch.arange(1, width + 1, device=mask.device)
    last = (active * positions).amax(dim=1) if width else torch.zeros(batch, dtype=torch.long, device=mask.device)
    stats = torch.stack([last.long(), active.sum(dim=1)]).tolist()  # one host sync per column
    row_end, row_tokens = stats[0], stats[1]

    if mini_batch_num_tokens is None:
        ranges = [(b, min(b + mini_batch_size, batch)) for b in range(0, batch, mini_batch_size)]
    else:
        ranges, begin = [], 0
        while begin < batch:
            end, tokens = begin + 1, row_tokens[begin]
            while end < batch and tokens + row_tokens[end] <= mini_batch_num_tokens:
                tokens += row_tokens[end]
                end += 1
            ranges.append((begin, end))
            begin = end
    ends: list[int | None] = []
    for begin, end in ranges:
        used = max(row_end[begin:end])
        ends.append(used if 0 < used < width else None)
    return _ColumnPlan(ranges, ends)


def minibatch_ranges(
    features: Features, mini_batch_size: int = 32, mini_batch_num_tokens: int | None = None
) -> list[tuple[int, int]]:
    """The ``(begin, end)`` row ranges that split one column into mini-batches.

    By count: ``mini_batch_size`` rows each (the last may be shorter). By token budget (``mini_batch_num_tokens``
    set; ``mini_batch_size`` is then ignored): consecutive rows packed greedily while their non-padding token count
    (``attention_mask`` sum) stays within the budget; a row over the budget forms its own mini-batch.
    """
    validate_mini_batching(mini_batch_size, mini_batch_num_tokens)
    batch = _column_batch_size("features", features)
    return _plan_column("features", features, batch, mini_batch_size, mini_batch_num_tokens).ranges


def slice_minibatch(features: Features, begin: int, end: int, seq_end: int | None = None) -> dict[str, Any]:
    """Rows ``begin:end`` of every batched tensor; with ``seq_end``, tensors whose dim 1 has the width of
    ``attention_mask`` keep only their first ``seq_end`` positions (trailing padding; left padding stays).
    Scalars, non-tensor values and a one-value ``prompt_length`` pass through unchanged."""
    mask = features.get("attention_mask")
    width = mask.shape[1] if isinstance(mask, Tensor) and mask.ndim == 2 else None
    rows = next((v.shape[0] for k, v in features.items() if k in _BATCH_KEYS and isinstance(v, Tensor)), None)
    out: dict[str, Any] = {}
    for key, value in features.items():
        if not isinstance(value, Tensor) or value.ndim == 0 or (key in _METADATA_KEYS and value.shape[0] != rows):
            out[key] = value
        elif seq_end is not None and value.ndim >= 2 and value.shape[1] == width:
            out[key] = value[begin:end, :seq_end]
        else:
            out[key] = value[begin:end]
    return out


def _embed(encoder: Encoder, features: dict[str, Any], output_key: str, rows: int, where: str) -> Tensor:
    output = encoder(features)
    if isinstance(output, Tensor):
        embeddings = output
    elif isinstance(output, Mapping) and isinstance(output.get(output_key), Tensor):
        embeddings = output[output_key]
    else:
        found = sorted(output) if isinstance(output, Mapping) else type(output).__name__
        raise ValueError(
            f"encoder(features) must return a Tensor [batch, dim] or a mapping with a {output_key!r} tensor "
            f"(output_key), got {found} for {where}"
        )
    if embeddings.ndim != 2 or embeddings.shape[0] != rows:
        raise ValueError(
            f"encoder output {output_key!r} must have shape [{rows}, dim] for {where}, got {tuple(embeddings.shape)}"
        )
    return embeddings


def _ddp_module(encoder: Encoder) -> DistributedDataParallel | None:
    module = getattr(encoder, "__self__", encoder)  # a bound ``forward``
    module = getattr(module, "_orig_mod", module)  # torch.compile
    return module if isinstance(module, DistributedDataParallel) else None


def _devices(encoder: Encoder, columns: Sequence[Features]) -> set[torch.device]:
    devices = {v.device for c in columns for v in c.values() if isinstance(v, Tensor)}
    module = getattr(encoder, "__self__", encoder)
    if isinstance(module, nn.Module):
        devices.update(p.device for p in module.parameters())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices.add(torch.device("cuda", torch.cuda.current_device()))
    return devices


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="mini-batch")


def cached_forward(
    encoder: Encoder,
    columns: Sequence[Features],
    calculate_loss: CalculateLoss,
    *,
    mini_batch_size: int = 32,
    mini_batch_num_tokens: int | None = None,
    output_key: str = "sentence_embedding",
    show_progress_bar: bool = False,
    loss_parameters: Iterable[Tensor] = (),
) -> Tensor:
    """Steps 1 and 2 of GradCache; returns the scalar loss whose backward runs step 3 (see the module docstring).

    ``encoder(features)`` maps one mini-batch's feature dict to embeddings: a Tensor [rows, dim] or a mapping
    holding one under ``output_key`` (a SentenceTransformer, a DDP-wrapped module, or e.g.
    ``lambda f: mean_pool(auto_model(**f).last_hidden_state, f["attention_mask"])``). Pass the DDP module itself
    (or its bound ``forward``) so that the replay can defer the all-reduce.

    ``calculate_loss(reps, with_backward=...)`` gets ``reps[column][mini_batch]``: leaf tensors [rows, dim]. With
    ``with_backward=True`` it must back-propagate its loss (leaving ``.grad`` on every rep) and return it detached;
    every column must receive a gradient. ``loss_parameters`` are the loss's own trainable tensors (a learnable
    scale): their step-2 gradients are deferred to the backward and multiplied by its grad_output like the encoder's.

    Without grad mode (evaluation) this is the loss alone: no RNG capture, no hook. Raises ValueError on bad columns,
    mini-batch settings or encoder output.
    """
    validate_mini_batching(mini_batch_size, mini_batch_num_tokens)
    columns = list(columns)
    if not columns:
        raise ValueError("columns must hold at least one mapping of batched features")
    batch = _column_batch_size("columns[0]", columns[0])
    for k, column in enumerate(columns[1:], start=1):
        size = _column_batch_size(f"columns[{k}]", column)
        if size != batch:
            raise ValueError(f"columns[{k}] has batch size {size}; every column must have that of columns[0] ({batch})")
    plans = [
        _plan_column(f"columns[{k}]", column, batch, mini_batch_size, mini_batch_num_tokens)
        for k, column in enumerate(columns)
    ]
    grad_enabled = torch.is_grad_enabled()
    total = sum(len(plan.ranges) for plan in plans)
    ddp = _ddp_module(encoder)
    if grad_enabled and ddp is not None and ddp.static_graph:
        raise ValueError(
            "encoder: DistributedDataParallel with static_graph=True is not supported (GradCache runs one backward "
            "per mini-batch); wrap the model with static_graph=False"
        )

    devices = _devices(encoder, columns)
    cuda_devices = [torch.cuda.current_device() if d.index is None else d.index for d in devices if d.type == "cuda"]
    use_mps = any(d.type == "mps" for d in devices)
    autocast = _autocast_states({"cpu"} | {d.type for d in devices if d.type in ("cuda", "mps")})

    reps: list[list[Tensor]] = []
    rng_states: list[list[RNGState | None]] = []
    bar = _progress(total, "GradCache: embed", show_progress_bar)
    for k, (column, plan) in enumerate(zip(columns, plans)):
        reps.append([])
        rng_states.append([])
        for (begin, end), seq_end in zip(plan.ranges, plan.ends):
            minibatch = slice_minibatch(column, begin, end, seq_end)
            rng_states[k].append(RNGState(cuda_devices, mps=use_mps) if grad_enabled else None)
            with torch.no_grad():
                embeddings = _embed(encoder, minibatch, output_key, end - begin, f"columns[{k}] rows {begin}:{end}")
            reps[k].append(embeddings.detach().requires_grad_(grad_enabled))
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()

    if not grad_enabled:
        return calculate_loss(reps, with_backward=False)

    loss_parameters = [p for p in loss_parameters if p.requires_grad]
    outer_grads = [p.grad for p in loss_parameters]
    for p in loss_parameters:
        p.grad = None
    loss = calculate_loss(reps, with_backward=True)
    deferred = [p.grad for p in loss_parameters]
    for p, grad in zip(loss_parameters, outer_grads):
        p.grad = grad

    cache = [[rep.grad for rep in column] for column in reps]
    unused = [str(k) for k, grads in enumerate(cache) if any(g is None for g in grads)]
    if unused:
        raise ValueError(
            f"the loss did not use column(s) {', '.join(unused)}: their embeddings received no gradient; "
            "pass only the columns the loss reads"
        )
    del reps

    result = loss.detach().clone().requires_grad_(True)
    result.register_hook(
        partial(
            _replay,
            encoder=encoder,
            columns=columns,
            plans=plans,
            cache=cache,
            rng_states=rng_states,
            autocast=autocast,
            output_key=output_key,
            show_progress_bar=show_progress_bar,
            loss_parameters=list(zip(loss_parameters, deferred)),
        )
    )
    return result


def _replay(
    grad_output: Tensor,
    *,
    encoder: Encoder,
    columns: list[Features],
    plans: list[_ColumnPlan],
    cache: list[list[Tensor]],
    rng_states: list[list[RNGState]],
    autocast: list[tuple[str, bool, torch.dtype]],
    output_key: str,
    show_progress_bar: bool,
    loss_parameters: list[tuple[Tensor, Tensor | None]],
) -> None:
    """Step 3: the backward hook on the returned loss."""
    if any(grad is None for grads in cache for grad in grads):
        raise RuntimeError("this GradCache loss was already back-propagated; its cached gradients are spent")
    ddp = _ddp_module(encoder)
    total = sum(len(grads) for grads in cache)
    done = 0
    synced = ddp is None
    bar = _progress(total, "GradCache: replay", show_progress_bar)
    with torch.enable_grad():
        for k, (column, plan) in enumerate(zip(columns, plans)):
            for j, ((begin, end), seq_end) in enumerate(zip(plan.ranges, plan.ends)):
                done += 1
                last = done == total
                grad = cache[k][j]
                sync = contextlib.nullcontext() if last or ddp is None else ddp.no_sync()
                with sync, rng_states[k][j], _autocast(autocast):
                    minibatch = slice_minibatch(column, begin, end, seq_end)
                    embeddings = _embed(encoder, minibatch, output_key, end - begin, f"columns[{k}] rows {begin}:{end}")
                    if embeddings.shape != grad.shape:
                        raise RuntimeError(
                            f"replayed embeddings of columns[{k}] rows {begin}:{end} have shape "
                            f"{tuple(embeddings.shape)}, the first pass {tuple(grad.shape)}"
                        )
                    if embeddings.requires_grad:
                        dtype = torch.promote_types(embeddings.dtype, grad.dtype)
                        dtype = torch.promote_types(dtype, grad_output.dtype)
                        if dtype in (torch.float16, torch.bfloat16):
                            dtype = torch.float32
                        surrogate = torch.dot(embeddings.flatten().to(dtype), grad.flatten().to(dtype))
                        (surrogate * grad_output.to(dtype)).backward()
                        synced = synced or last
                cache[k][j] = None  # free each cached gradient once used
                if bar is not None:
                    bar.update()
    if bar is not None:
        bar.close()
    if not synced:
        raise RuntimeError(
            "GradCache under DDP: the last mini-batch's embeddings do not require grad, so no all-reduce ran; "
            "put a column the encoder trains on last"
        )
    for p, grad in loss_parameters:
        if grad is not None:
            scaled = grad * grad_output.to(grad.dtype)
            p.grad = scaled if p.grad is None else p.grad + scaled


def cached_loss(
    encoder: Encoder,
    columns: Sequence[Features],
    loss_fn: Callable[[list[Tensor]], Tensor],
    *,
    mini_batch_size: int = 32,
    mini_batch_num_tokens: int | None = None,
    output_key: str = "sentence_embedding",
    show_progress_bar: bool = False,
    loss_parameters: Iterable[Tensor] | None = None,
) -> Tensor:
    """The loss ``loss_fn([emb_column_0, emb_column_1, ...])`` (each [B, D]) over the encoder's embeddings of
    ``columns``, computed by GradCache: call ``.backward()`` on it (directly, scaled, or divided for gradient
    accumulation) to fill the encoder's gradients. E.g. ``cached_loss(model, [queries, docs],
    lambda e: fastloss.functional.mnrl_loss(e[0], e[1:]))``. ``loss_parameters`` defaults to the trainable
    parameters of ``loss_fn`` when it is an ``nn.Module``. See :func:`cached_forward` for the rest.
    """
    if loss_parameters is None:
        loss_parameters = loss_fn.parameters() if isinstance(loss_fn, nn.Module) else ()

    def calculate_loss(reps: list[list[Tensor]], *, with_backward: bool) -> Tensor:
        loss = loss_fn([torch.cat(column) for column in reps])
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar tensor, got {getattr(loss, 'shape', type(loss).__name__)}")
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss.reshape(())

    return cached_forward(
        encoder,
        columns,
        calculate_loss,
        mini_batch_size=mini_batch_size,
        mini_batch_num_tokens=mini_batch_num_tokens,
        output_key=output_key,
        show_progress_bar=show_progress_bar,
        loss_parameters=loss_parameters,
    )


def gradcache_step(
    encoder: Encoder,
    columns: Sequence[Features],
    loss_fn: Callable[[list[Tensor]], Tensor],
    *,
    mini_batch_size: int = 32,
    mini_batch_num_tokens: int | None = None,
    output_key: str = "sentence_embedding",
    show_progress_bar: bool = False,
) -> Tensor:
    """One cached training step's forward and backward: accumulates the gradients of ``loss_fn`` over the
    embeddings of ``columns`` into the encoder's parameters (as ``loss_fn(...).backward()`` on the uncached
    embeddings would) and returns the detached loss. The optimizer step and ``zero_grad`` are the caller's.
    The benchmark entry point (op ``gradcache_step``); see :func:`cached_loss` for the arguments."""
    if not torch.is_grad_enabled():
        raise ValueError("gradcache_step computes gradients; call it with grad mode enabled (not under no_grad)")
    loss = cached_loss(
        encoder,
        columns,
        loss_fn,
        mini_batch_size=mini_batch_size,
        mini_batch_num_tokens=mini_batch_num_tokens,
        output_key=output_key,
        show_progress_bar=show_progress_bar,
    )
    loss.backward()
    return loss.detach()
