"""Handlers: a served model is `preprocess -> model -> postprocess`.

A request's input becomes *rows* (one per item along the batch dimension: a tensor, or the
token ids of one text); the batcher groups the rows of many requests by `key` (rows of one key
can be stacked or padded together); `predict` runs the model once over the rows of a batch and
returns one output per row; the outputs go back to JSON (`/predict`) or to named tensors
(KServe v2). Built in: `TensorHandler` (tensors in, tensors out), `EmbeddingHandler` (tokenize,
mean-pool, L2-normalise) and `ClassificationHandler` (labels and scores). `UserHandler` wraps
one of them with a module's own `preprocess(data) -> rows` and `postprocess(outputs)`.

Row order is kept: `predict(rows)[i]` belongs to `rows[i]`, and a batch's answer for a row is
the answer it gets alone (up to float rounding of padded or stacked kernels).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fleetserve.tensor.loading import ModelLoadError, exported_input

MIN_LENGTH_BUCKET = 16  # token lengths are bucketed to powers of two from here
CHUNK_ROWS = 16  # a text batch runs as chunks of this many rows of similar length


class BadInput(ValueError):
    """The client's input does not fit the model (HTTP 400); the message names the problem."""


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor of the KServe v2 metadata; -1 in `shape` is any size (dim 0: batch)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    known_rank: bool = True  # False: `shape` is (-1,), and any rank is taken

    def metadata(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


V2_TO_NUMPY = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}
TORCH_TO_V2 = {
    torch.bool: "BOOL",
    torch.uint8: "UINT8",
    torch.int8: "INT8",
    torch.int16: "INT16",
    torch.int32: "INT32",
    torch.int64: "INT64",
    torch.float16: "FP16",
    torch.float32: "FP32",
    torch.float64: "FP64",
}


class Handler:
    """The interface of every handler. `predict` runs on a worker thread; the rest on the
    request's path, where a `BadInput` becomes a 400."""

    task = "tensor"
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    # The request path may run `rows_from_*` / `to_*` on the event loop for a small body or
    # answer: true of the built-in steps (bounded work), not of a user's `preprocess` or
    # `postprocess` (they may do anything, sleep included).
    inline_preprocess = True
    inline_postprocess = True

    def rows_from_json(self, data: Any) -> list:
        raise NotImplementedError

    def rows_from_tensors(self, tensors: dict[str, np.ndarray]) -> list:
        raise NotImplementedError

    def key(self, rows: list) -> Hashable:
        """Rows of requests with equal keys may share a batch."""
        raise NotImplementedError

    def predict(self, rows: list) -> list:
        raise NotImplementedError

    def to_json(self, outputs: list) -> Any:
        raise NotImplementedError

    def to_tensors(self, outputs: list) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def only_input(self, tensors: dict[str, np.ndarray]) -> np.ndarray:
        """The one input tensor this handler takes, checked against its spec."""
        spec = self.inputs[0]
        if spec.name not in tensors:
            raise BadInput(f"missing input {spec.name!r}; this model takes {[spec.name]}")
        extra = sorted(set(tensors) - {spec.name})
        if extra:
            raise BadInput(f"unknown inputs {extra}; this model takes {[spec.name]}")
        array = tensors[spec.name]
        if array.ndim < 1 or array.shape[0] < 1:
            raise BadInput(f"input {spec.name!r} needs a batch dimension of at least 1")
        if spec.known_rank and not fits(spec.shape, array.shape):
            raise BadInput(
                f"input {spec.name!r} has shape {list(array.shape)}; this model takes "
                f"{list(spec.shape)} (-1: any size)"
            )
        return array


def fits(spec_shape: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """`shape` has the spec's rank and its sizes where the spec fixes them (-1: any)."""
    return len(spec_shape) == len(shape) and all(
        want in (-1, got) for want, got in zip(spec_shape, shape, strict=True)
    )


class TensorHandler(Handler):
    """One tensor in (batch first), one tensor out: a TorchScript, exported or eager module
    whose forward takes `x: (batch, *row_shape)`. Rows of one shape batch together.
    `row_shape` (-1: any size), when known (a torch.export program records it), is checked
    at the door; else a shape the model refuses fails at its forward, alone."""

    def __init__(
        self,
        model: torch.nn.Module,
        dtype: torch.dtype = torch.float32,
        row_shape: tuple[int, ...] | None = None,
    ) -> None:
        self.model = model
        self.dtype = dtype
        self.row_shape = row_shape
        datatype = TORCH_TO_V2[dtype]
        if row_shape is None:
            self.inputs = (TensorSpec("input__0", datatype, (-1,), known_rank=False),)
        else:
            self.inputs = (TensorSpec("input__0", datatype, (-1, *row_shape)),)
        self.outputs = (TensorSpec("output__0", "FP32", (-1,), known_rank=False),)

    def rows_from_json(self, data: Any) -> list[torch.Tensor]:
        if not isinstance(data, list) or not data:
            raise BadInput("'inputs' must be a non-empty list of rows (the batch dimension)")
        try:
            batch = torch.tensor(data, dtype=self.dtype)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise BadInput(
                f"'inputs' must be a rectangular list of numbers ({TORCH_TO_V2[self.dtype]}): {exc}"
            ) from None
        if batch.ndim < 1 or (
            self.row_shape is not None and not fits(self.row_shape, batch.shape[1:])
        ):
            raise BadInput(
                f"'inputs' has shape {list(batch.shape)}; this model takes "
                f"{list(self.inputs[0].shape)} (-1: any size)"
            )
        return list(batch.unbind(0))

    def rows_from_tensors(self, tensors: dict[str, np.ndarray]) -> list[torch.Tensor]:
        spec = self.inputs[0]
        array = self.only_input(tensors)
        if array.dtype != V2_TO_NUMPY[spec.datatype]:
            raise BadInput(
                f"input {spec.name!r} has datatype {_v2_name(array.dtype)}; "
                f"this model takes {spec.datatype}"
            )
        return list(torch.from_numpy(np.array(array, copy=True)).unbind(0))  # writable

    def key(self, rows: list[torch.Tensor]) -> Hashable:
        shapes = {tuple(r.shape) for r in rows}
        if len(shapes) != 1:
            raise BadInput(f"the rows of one request differ in shape: {sorted(shapes)}")
        return shapes.pop()

    def predict(self, rows: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.inference_mode():
            out = self.model(torch.stack(rows))
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.ndim < 1 or out.shape[0] != len(rows):
            raise TypeError("the model must return a tensor with the batch dimension first")
        return list(out.float().unbind(0))

    def to_json(self, outputs: list[torch.Tensor]) -> Any:
        return [o.tolist() for o in outputs]

    def to_tensors(self, outputs: list[torch.Tensor]) -> dict[str, np.ndarray]:
        return {self.outputs[0].name: torch.stack(outputs).numpy()}


class TextHandler(Handler):
    """Texts in, tokenized once with the model's own tokenizer (truncated to the model's
    length). Rows are token-id lists; requests are bucketed by powers of two of their longest
    row so that padding stays under 2x, and a batch runs sorted by length in chunks, each
    padded to its own longest."""

    def __init__(self, model: torch.nn.Module, folder: str | Path) -> None:
        from tokenizers import Tokenizer

        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise ModelLoadError(f"{folder} has no tokenizer.json (a fast tokenizer is needed)")
        self.model = model
        self.max_length = max_text_tokens(folder, model)
        # The `tokenizers` object, set up once: encoding then only reads it, so the request
        # threads can share it (a transformers tokenizer may rewrite its settings per call).
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer.no_padding()
        self.pad_id = getattr(model.config, "pad_token_id", None) or 0
        self.inputs = (TensorSpec("text", "BYTES", (-1,)),)

    def rows_from_json(self, data: Any) -> list[list[int]]:
        texts = [data] if isinstance(data, str) else data
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise BadInput("'inputs' must be a string or a non-empty list of strings")
        return self.tokenize(texts)

    def rows_from_tensors(self, tensors: dict[str, np.ndarray]) -> list[list[int]]:
        array = self.only_input(tensors)
        if array.ndim != 1:
            raise BadInput(f"input 'text' must be 1-D (one text per row), got {array.ndim}-D")
        texts = []
        for item in array.tolist():
            if isinstance(item, bytes):
                try:
                    item = item.decode("utf-8")
                except UnicodeDecodeError:
                    raise BadInput("input 'text' holds bytes that are not UTF-8") from None
            if not isinstance(item, str):
                raise BadInput("input 'text' must be BYTES (UTF-8 strings)")
            texts.append(item)
        return self.tokenize(texts)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a lone UTF-16 surrogate ("\ud800") in the JSON
                raise BadInput("a text holds a lone UTF-16 surrogate: not valid Unicode") from None
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def key(self, rows: list[list[int]]) -> Hashable:
        longest = max(len(r) for r in rows)
        return max(MIN_LENGTH_BUCKET, 1 << math.ceil(math.log2(max(longest, 1))))

    def forward(self, rows: list[list[int]]):
        """The model over `rows` padded to their longest: (its output, the attention mask)."""
        longest = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        with torch.inference_mode():
            return self.model(input_ids=input_ids, attention_mask=attention_mask), attention_mask

    def predict(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """`predict_padded` over the rows sorted by length, `CHUNK_ROWS` at a time, each chunk
        padded to its own longest: a batch of 32 sentences of 7-30 tokens takes 29% less CPU
        than padding all 32 to the longest (`benchmarks/README.md`)."""
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        outputs: list[torch.Tensor] = [None] * len(rows)  # type: ignore[list-item]
        for start in range(0, len(order), CHUNK_ROWS):
            chunk = order[start : start + CHUNK_ROWS]
            for i, output in zip(chunk, self.predict_padded([rows[i] for i in chunk]), strict=True):
                outputs[i] = output
        return outputs

    def predict_padded(self, rows: list[list[int]]) -> list[torch.Tensor]:
        raise NotImplementedError


class EmbeddingHandler(TextHandler):
    """Sentence embeddings: the encoder's last hidden state, mean-pooled over the real tokens
    and L2-normalised (sentence-transformers' recipe for all-MiniLM-L6-v2)."""

    task = "embed"

    def __init__(self, model: torch.nn.Module, folder: str | Path, normalize: bool = True) -> None:
        super().__init__(model, folder)
        self.normalize = normalize
        self.outputs = (TensorSpec("embedding", "FP32", (-1, model.config.hidden_size)),)

    def predict_padded(self, rows: list[list[int]]) -> list[torch.Tensor]:
        out, mask = self.forward(rows)
        # hidden: [B, S, H]; mask: [B, S]
        hidden = out.last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return list(pooled.float().unbind(0))

    def to_json(self, outputs: list[torch.Tensor]) -> Any:
        return [o.tolist() for o in outputs]

    def to_tensors(self, outputs: list[torch.Tensor]) -> dict[str, np.ndarray]:
        return {"embedding": torch.stack(outputs).numpy()}


class ClassificationHandler(TextHandler):
    """Sequence classification: softmax over the head's logits, labels from the config."""

    task = "classify"

    def __init__(self, model: torch.nn.Module, folder: str | Path) -> None:
        super().__init__(model, folder)
        id2label = model.config.id2label
        self.labels = [str(id2label[i]) for i in range(len(id2label))]
        self.outputs = (
            TensorSpec("probabilities", "FP32", (-1, len(self.labels))),
            TensorSpec("label", "BYTES", (-1,)),
        )

    def predict_padded(self, rows: list[list[int]]) -> list[torch.Tensor]:
        out, _ = self.forward(rows)
        return list(out.logits.float().softmax(-1).unbind(0))

    def to_json(self, outputs: list[torch.Tensor]) -> Any:
        answers = []
        for probs in outputs:
            best = int(probs.argmax())
            scores = dict(zip(self.labels, probs.tolist(), strict=True))
            label = self.labels[best]
            answers.append({"label": label, "score": scores[label], "scores": scores})
        return answers

    def to_tensors(self, outputs: list[torch.Tensor]) -> dict[str, np.ndarray]:
        probs = torch.stack(outputs)
        labels = np.array([self.labels[int(i)].encode() for i in probs.argmax(-1)], np.object_)
        return {"probabilities": probs.numpy(), "label": labels}


class UserHandler(Handler):
    """A built-in handler with a module's own steps: `preprocess(data) -> rows` (a list of
    tensors, or one tensor whose first dimension is the batch) and/or `postprocess(outputs:
    list) -> JSON`, the seed's two functions. The module is code the operator names, run as is."""

    def __init__(self, base: Handler, module: Any) -> None:
        self.base = base
        self.module = module
        self.inline_preprocess = not hasattr(module, "preprocess")
        self.inline_postprocess = not hasattr(module, "postprocess")
        self.task = base.task
        self.inputs = base.inputs
        self.outputs = base.outputs

    def rows_from_json(self, data: Any) -> list:
        if not hasattr(self.module, "preprocess"):
            return self.base.rows_from_json(data)
        try:
            rows = self.module.preprocess(data)
        except BadInput:
            raise
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise BadInput(f"preprocess refused the input: {exc}") from None
        if isinstance(rows, torch.Tensor):
            rows = list(rows.unbind(0))
        if not isinstance(rows, list) or not rows:
            raise BadInput("preprocess made no rows from the input")
        return rows

    def rows_from_tensors(self, tensors: dict[str, np.ndarray]) -> list:
        return self.base.rows_from_tensors(tensors)

    def key(self, rows: list) -> Hashable:
        return self.base.key(rows)

    def predict(self, rows: list) -> list:
        return self.base.predict(rows)

    def to_json(self, outputs: list) -> Any:
        if hasattr(self.module, "postprocess"):
            return self.module.postprocess(outputs)
        return self.base.to_json(outputs)

    def to_tensors(self, outputs: list) -> dict[str, np.ndarray]:
        return self.base.to_tensors(outputs)


def import_handler_module(name: str) -> Any:
    """`path/to/handler.py` or an importable module name."""
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise ModelLoadError(f"--handler {name}: no such file")
        spec = importlib.util.spec_from_file_location(f"fleetserve_handler_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ModelLoadError(f"--handler {name}: {exc}") from None


def build_handler(
    model: torch.nn.Module, model_path: str, task: str, handler_module: str | None = None
) -> Handler:
    if task == "embed":
        handler: Handler = EmbeddingHandler(model, model_path)
    elif task == "classify":
        handler = ClassificationHandler(model, model_path)
    elif task == "tensor":
        dtype, row_shape = exported_input(model_path)
        handler = TensorHandler(model, dtype, row_shape)
    else:
        raise ModelLoadError(
            f"unknown task {task!r} for a tensor model; choose embed, classify or tensor"
        )
    if handler_module:
        handler = UserHandler(handler, import_handler_module(handler_module))
    return handler


def max_text_tokens(folder: Path, model: torch.nn.Module) -> int:
    """sentence-transformers' `max_seq_length` when the folder has one, else the model's
    position limit."""
    limit = int(getattr(model.config, "max_position_embeddings", 512))
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():
        limit = min(limit, int(json.loads(st_config.read_text()).get("max_seq_length", limit)))
    return limit


def _v2_name(dtype: np.dtype) -> str:
    for name, np_type in V2_TO_NUMPY.items():
        if np.dtype(np_type) == dtype:
            return name
    return str(dtype)
