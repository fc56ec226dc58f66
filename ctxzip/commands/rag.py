"""``ctxzip rag``: build a passage index, retrieve + compress, train RECOMP's extractive encoder."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("rag", help="retrieval pipeline: index, query, compress, train-extractive",
                       description="Retrieval-augmented compression (RECOMP) over a faiss index.")
    rs = p.add_subparsers(dest="rag_command", metavar="RAG_COMMAND")

    q = rs.add_parser("index", help="chunk documents into passages and build a faiss index")
    q.add_argument("inputs", nargs="+", help="text files, directories of .txt/.md/.rst, "
                   "JSONL files with {'id','text'} lines, or 'pydoc' (pydoc_data.topics)")
    q.add_argument("--out", required=True, help="index directory to write")
    q.add_argument("--words", type=int, default=100, help="words per passage (default 100)")
    q.add_argument("--encoder", default=None, help="sentence-transformers id/path (default MiniLM)")
    q.add_argument("--ivf-min", type=int, default=20_000,
                   help="use an IVF index from this many passages on (default 20000)")
    q.set_defaults(func=_index)

    q = rs.add_parser("query", help="retrieve top-k passages, compress them, print the prompt")
    q.add_argument("index", help="index directory (ctxzip rag index)")
    q.add_argument("query", help="the query (use - to read it from stdin)")
    q.add_argument("-k", type=int, default=5, help="passages to retrieve (default 5)")
    _compress_args(q)
    q.set_defaults(func=_query)

    q = rs.add_parser("compress", help="compress documents for a query (no retrieval)")
    q.add_argument("documents", nargs="+", help="document files (one document per file)")
    q.add_argument("--query", required=True)
    _compress_args(q)
    q.set_defaults(func=_compress)

    q = rs.add_parser("train-extractive", help="fine-tune the extractive compressor's encoder on "
                      "sentences labelled by the target LM's continuation-NLL gain (RECOMP)")
    q.add_argument("--out", required=True, help="directory for the trained compressor")
    q.add_argument("--corpus", default="pydoc", help="'pydoc' (default), a JSONL file of "
                   "{'id','text','source'} or a directory of text files")
    q.add_argument("--test-fraction", type=float, default=0.3,
                   help="fraction of sources (topics/files) held out for testing and never "
                   "trained on (default 0.3; the split is recorded in train_report.json)")
    q.add_argument("--split-seed", type=int, default=0)
    q.add_argument("--index", default=None, help="reuse a saved passage index of the whole "
                   "corpus (ctxzip rag index; passages need metadata doc_id) instead of "
                   "embedding it again")
    q.add_argument("--encoder", default=None, help="encoder to start from (default MiniLM)")
    q.add_argument("--lm", default=None, help="target LM giving the teacher signal "
                   "(default SmolLM2-135M-Instruct)")
    q.add_argument("--max-docs", type=int, default=None, help="cap the training documents")
    q.add_argument("--max-per-doc", type=int, default=2, help="cases cut per document")
    q.add_argument("--prefix-tokens", type=int, default=128,
                   help="LM prefix per case (default 128)")
    q.add_argument("--continuation-tokens", type=int, default=64,
                   help="continuation scored by the teacher LM (default 64)")
    q.add_argument("--max-sentences", type=int, default=12,
                   help="candidate sentences labelled by the teacher LM per case (the starting "
                   "encoder's top ones; default 12)")
    q.add_argument("--teacher-dtype", default=None, choices=["float32", "bfloat16"],
                   help="teacher LM dtype (default fp32; bfloat16 labels ~2x faster on CPU)")
    q.add_argument("--epochs", type=int, default=3)
    q.add_argument("--seed", type=int, default=0, help="shuffling/training seed")
    q.add_argument("--batch-size", type=int, default=32)
    q.add_argument("--lr", type=float, default=2e-5)
    q.add_argument("--budget", type=float, default=0.2,
                   help="rate used to calibrate the selective threshold (default 0.2)")
    q.set_defaults(func=_train)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _compress_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("--method", default="extractive",
                   choices=["extractive", "abstractive", "none"])
    q.add_argument("--budget", default="20%", help="'20%%', '0.2', '5x' or a count (default 20%%)")
    q.add_argument("--unit", default="tokens", choices=["tokens", "sentences"],
                   help="what the extractive budget counts")
    q.add_argument("--encoder", default=None, help="extractive encoder (id/path or a trained "
                   "compressor directory)")
    q.add_argument("--model", default=None, help="abstractive model (default SmolLM2)")
    q.add_argument("--json", action="store_true", help="print a JSON result")


def _load_documents(spec: str) -> list[Any]:
    from ctxzip.eval.corpora import Document

    if spec == "pydoc":
        from ctxzip.rag.train_extractive import pydoc_documents

        return pydoc_documents()
    p = Path(spec).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"no such corpus: {spec!r}")
    if p.is_dir():
        files = sorted(x for x in p.rglob("*") if x.suffix in (".txt", ".md", ".rst"))
        if not files:
            raise ValueError(f"{spec!r} holds no .txt/.md/.rst files")
        return [Document(str(f.relative_to(p)), f.read_text(encoding="utf-8"), str(f))
                for f in files]
    if p.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                d = json.loads(line)
                if "text" not in d:
                    raise ValueError(f"{spec}:{i + 1}: no 'text' field")
                docs.append(Document(str(d.get("id", i)), d["text"], str(d.get("source", spec))))
        return docs
    return [Document(p.name, p.read_text(encoding="utf-8"), str(p))]


def _make_compressor(args: argparse.Namespace) -> Any:
    if args.method == "none":
        return None
    if args.method == "abstractive":
        from ctxzip.prompt import AbstractiveCompressor

        return AbstractiveCompressor(model=args.model)
    from ctxzip.prompt import ExtractiveCompressor
    from ctxzip.prompt.extractive import CONFIG_NAME

    if args.encoder and (Path(args.encoder) / CONFIG_NAME).is_file():
        return ExtractiveCompressor.from_pretrained(args.encoder, unit=args.unit)
    return ExtractiveCompressor(encoder=args.encoder, unit=args.unit)


def _print_result(args: argparse.Namespace, prompt: str, res: Any, extra: dict) -> None:
    if args.json:
        d = res.to_dict(with_details=True) if res is not None else {}
        d.pop("kept", None)
        print(json.dumps({"prompt": prompt, **extra, **d}, indent=2, default=str))
        return
    print(prompt)
    if res is not None:
        print(f"\n[{res.method}: {res.original_tokens} -> {res.compressed_tokens} tokens, "
              f"rate {res.rate:.3f}]", file=sys.stderr)


def _index(args: argparse.Namespace) -> int:
    from ctxzip.rag.index import index_documents

    docs = [d for spec in args.inputs for d in _load_documents(spec)]
    idx = index_documents(docs, words=args.words, encoder=args.encoder, progress=True,
                          ivf_min_passages=args.ivf_min)
    idx.save(args.out)
    print(f"indexed {len(idx)} passages from {len(docs)} documents ({idx.kind}) -> {args.out}")
    return 0


def _query(args: argparse.Namespace) -> int:
    from ctxzip.rag import PassageIndex, RAGPipeline

    query = sys.stdin.read() if args.query == "-" else args.query
    pipe = RAGPipeline(PassageIndex.load(args.index), _make_compressor(args), k=args.k)
    out = pipe.run(query, budget=args.budget)
    hits = [{"id": h.passage.id, "score": h.score, **h.passage.metadata} for h in out.hits]
    _print_result(args, out.prompt, out.compression, {"hits": hits})
    return 0


def _compress(args: argparse.Namespace) -> int:
    from ctxzip.compressor import check_budget
    from ctxzip.rag.pipeline import DEFAULT_TEMPLATE, compress_documents

    docs = []
    for f in args.documents:
        p = Path(f)
        if not p.is_file():
            raise FileNotFoundError(f"no such document: {f!r}")
        docs.append({"text": p.read_bytes(), "metadata": {"source": f}})
    comp = _make_compressor(args)
    if comp is None:
        text = "\n\n".join(d["text"].decode("utf-8") for d in docs)
        print(DEFAULT_TEMPLATE.format(context=text, query=args.query))
        return 0
    res = compress_documents(comp, docs, query=args.query, budget=check_budget(args.budget))
    prompt = DEFAULT_TEMPLATE.format(context=res.text, query=args.query) if res.text.strip() \
        else args.query
    _print_result(args, prompt, res, {})
    return 0


def _train(args: argparse.Namespace) -> int:
    import os

    import torch

    if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # honour the thread cap on CPU
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from ctxzip.rag.index import index_documents
    from ctxzip.rag.train_extractive import TrainConfig, split_by_source, train_extractive

    docs = _load_documents(args.corpus)
    train, test = split_by_source(docs, args.test_fraction, args.split_seed)
    if args.max_docs:
        train = train[: args.max_docs]
    if not train:
        raise ValueError("no training documents after the split")
    print(f"corpus: {len(docs)} documents; training on {len(train)}, holding out {len(test)} "
          f"(sources never trained on)", file=sys.stderr)
    if args.index:
        from ctxzip.rag.index import PassageIndex

        index = PassageIndex.load(args.index)
    else:
        index = index_documents(docs, encoder=args.encoder, progress=True)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      budget=args.budget, max_per_doc=args.max_per_doc,
                      max_sentences=args.max_sentences, prefix_tokens=args.prefix_tokens,
                      continuation_tokens=args.continuation_tokens, seed=args.seed,
                      teacher_dtype=args.teacher_dtype)
    report = train_extractive(train, index, args.out, encoder=args.encoder, lm=args.lm,
                              config=cfg)
    report["held_out_doc_ids"] = sorted(d.id for d in test)
    (Path(args.out) / "train_report.json").write_text(json.dumps(report, indent=2))
    keys = ("train_cases", "triplets", "threshold", "base_encoder_threshold",
            "dev_mean_gain_base_encoder", "dev_mean_gain_always",
            "dev_mean_gain_selective", "seconds_total")
    print(json.dumps({k: report[k] for k in keys}, indent=2))
    print(f"saved -> {args.out}")
    return 0
