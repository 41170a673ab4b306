"""Zero-shot evaluation: classification (class names x templates) and image-text retrieval.

    suite = load_suite("configs/eval/synthetic.yaml")      # tasks.py: tasks, suites, YAML
    results = evaluate(model, suite, preprocess_val, tokenizer, device, rank, world_size)
    tracker = BestTracker("synthetic_cls/top1")            # best.py: keep the best checkpoint
    python -m tuneclip_ds.eval --model NAME --pretrained PATH --tasks SUITE.yaml

Modules: ``tasks`` (what to evaluate), ``data`` (image folders and shards, split by sample
over ranks), ``encoder`` (the model adapter, fixed-size batches), ``collectives`` (lockstep,
gathers), ``metrics`` (top-k and recall@k counts), ``runner`` (``evaluate``), ``best``.
"""

from tuneclip_ds.eval.best import BestTracker
from tuneclip_ds.eval.encoder import ForwardEncoder, encode
from tuneclip_ds.eval.runner import check_suite, evaluate
from tuneclip_ds.eval.tasks import EvalTask, Suite, load_suite

__all__ = ["BestTracker", "EvalTask", "ForwardEncoder", "Suite", "check_suite", "encode", "evaluate", "load_suite"]
