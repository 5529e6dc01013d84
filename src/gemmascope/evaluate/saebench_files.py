"""SAEBench's result files: each eval of a record as SAEBench's JSON schema (`eval_type_id`,
`eval_config`, `eval_result_metrics`, `eval_result_details`, ...), in its `eval_results/{eval}/`
layout, so that our results load into SAEBench's plotting and leaderboard tools."""

from __future__ import annotations

import math
import time
import uuid
from pathlib import Path
from typing import Any

from gemmascope.evaluate.saebench import WRITER


def core_output(
    record: dict[str, Any], settings: dict[str, Any], sae_cfg: dict[str, Any]
) -> dict[str, Any]:
    """A record as SAEBench's `CoreEvalOutput` (its JSON schema): config, metrics, per-latent details.

    Non-finite and missing values are written as -1, as SAEBench does for NaN."""
    core = record["saebench"]["core"]
    details = record.get("saebench_details") or {}
    n = len(next(iter(details.values()), []))
    rows = [{"index": i, **{k: _finite(v[i]) for k, v in details.items()}} for i in range(n)]
    context, batch = settings.get("context_size", 1024), settings.get("batch_size", 8)
    batches = math.ceil(math.ceil(settings.get("tokens", context) / context) / batch)
    config = {
        "model_name": record["model"] or "", "llm_dtype": settings.get("model_dtype", "float32"),
        "batch_size_prompts": batch, "n_eval_reconstruction_batches": batches,
        "n_eval_sparsity_variance_batches": batches,
        "dataset": str(settings.get("corpus", "default")),
        "context_size": context,
        "compute_kl": True, "compute_ce_loss": True, "compute_l2_norms": True,
        "compute_sparsity_metrics": True, "compute_variance_metrics": True,
        "compute_featurewise_density_statistics": True,
        "compute_featurewise_weight_based_metrics": "encoder_norm" in details,
        "exclude_special_tokens_from_reconstruction": True, "verbose": False,
    }  # fmt: skip
    metrics = {cat: {k: _finite(v) for k, v in values.items()} for cat, values in core.items()}
    return _output(record, "core", config, metrics, rows, sae_cfg)


def sparse_probing_output(record: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """A record's sparse probing results as SAEBench's `SparseProbingEvalOutput`."""
    found = record["saebench"]["sparse_probing"]
    config = {
        "random_seed": 0, "dataset_names": [r["dataset_name"] for r in found["details"]],
        "probe_train_set_size": settings.get("probe_train", 1000),
        "probe_test_set_size": settings.get("probe_test", 250),
        "context_length": settings.get("probe_context", 128),
        "sae_batch_size": settings.get("batch_size", 8),
        "llm_batch_size": settings.get("batch_size", 8),
        "llm_dtype": settings.get("model_dtype", "float32"), "model_name": record["model"] or "",
        "k_values": settings.get("probe_k", [1, 2, 5]), "lower_vram_usage": False,
    }  # fmt: skip
    metrics = {"llm": found["llm"], "sae": found["sae"]}
    return _output(record, "sparse_probing", config, metrics, found["details"], None)


def absorption_output(record: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """A record's absorption results as SAEBench's `AbsorptionEvalOutput` (per-letter details in its
    fields; the probes' F1 per letter in `eval_result_unstructured`)."""
    found = record["saebench"]["absorption"]
    config = {k: v for k, v in found["config"].items() if k != "words"}
    config |= {"model_name": record["model"] or "", "llm_batch_size": settings.get("batch_size", 8),
               "llm_dtype": settings.get("model_dtype", "float32")}  # fmt: skip
    fields = ("first_letter", "mean_absorption_fraction", "full_absorption_rate",
              "num_full_absorption", "num_probe_true_positives", "num_split_features")  # fmt: skip
    details = [{k: _finite(row[k]) for k in fields} for row in found["details"]]
    out = _output(record, "absorption_first_letter", config, {"mean": found["mean"]}, details, None)
    out["eval_result_unstructured"] = {
        "words": found["config"]["words"], "probe_f1": found["probe_f1"]
    }  # fmt: skip
    return out


def autointerp_output(record: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """A record's auto-interpretation as SAEBench's `AutoInterpEvalOutput`; per-latent
    explanations and scores, the explainer and our balanced accuracies in
    `eval_result_unstructured` (where SAEBench keeps its per-latent results)."""
    from gemmascope.evaluate import autointerp as ai

    found = record["saebench"]["autointerp"]
    bands = ai.BANDS
    config = {
        "model_name": record["model"] or "", "n_latents": found["latents"],
        "override_latents": None, "dead_latent_threshold": ai.ALIVE_ABOVE,
        "random_seed": ai.SEED, "dataset_name": str(settings.get("corpus", "default")),
        "llm_context_size": settings.get("context_size", 1024),
        "llm_batch_size": settings.get("batch_size", 8),
        "llm_dtype": settings.get("model_dtype", "float32"), "buffer": ai.WINDOW,
        "no_overlap": True, "act_threshold_frac": ai.THRESHOLD_FRAC,
        "total_tokens": settings.get("tokens", 0), "scoring": True,
        "max_tokens_in_explanation": ai.EXPLANATION_TOKENS, "use_demos_in_explanation": False,
        "n_top_ex_for_generation": ai.TOP_EXPLAIN, "n_iw_sampled_ex_for_generation": bands,
        "n_top_ex_for_scoring": ai.TOP_SCORE, "n_random_ex_for_scoring": ai.RANDOM_SCORE,
        "n_iw_sampled_ex_for_scoring": bands,
    }  # fmt: skip
    metrics = {
        "autointerp": {k: _finite(found[k]) for k in ("autointerp_score", "autointerp_std_dev")}
    }
    out = _output(record, "autointerp", config, metrics, [], None)
    out["eval_result_unstructured"] = {k: found[k] for k in (
        "explainer", "detection", "fuzzing", "latents", "scored", "details")}  # fmt: skip
    return out


def _output(
    record: dict[str, Any], eval_type: str, config: dict[str, Any], metrics: dict[str, Any],
    details: list[dict[str, Any]], sae_cfg: dict[str, Any] | None,
) -> dict[str, Any]:  # fmt: skip
    """The fields every SAEBench result file has (its `BaseEvalOutput`) around one eval's own."""
    release, sae_id = _ids(record)
    return {
        "eval_type_id": eval_type, "eval_config": config, "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000), "eval_result_metrics": metrics,
        "eval_result_details": details, "sae_bench_commit_hash": WRITER, "sae_lens_id": sae_id,
        "sae_lens_release_id": release, "sae_lens_version": None, "sae_cfg_dict": sae_cfg,
        "eval_result_unstructured": None,
    }  # fmt: skip


def output_name(record: dict[str, Any]) -> str:
    """SAEBench's file name for a record: `{release}_{sae_id}_eval_results.json`, made path-safe."""
    release, sae_id = _ids(record)
    name = f"{release}_{sae_id}_eval_results.json"
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def _ids(record: dict[str, Any]) -> tuple[str, str]:
    """(release, SAE id) of a record: the source and `sae_id`, or the source's folder and name."""
    src = Path(str(record.get("source")))
    release, sae_id = (
        (src.name, record["sae_id"]) if record.get("sae_id") else (src.parent.name, src.name)
    )
    if record.get("cross_layer"):
        sae_id = f"{sae_id}_layer_{record['layer']}"
    return release or ".", sae_id


def _finite(v: Any) -> Any:
    return -1 if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def saebench_paths(
    folder: str | Path, records: list[dict[str, Any]], evals: list[str]
) -> list[Path]:
    """Where `write_saebench` puts each record's file of each eval (`source`, `sae_id`, `layer`,
    `cross_layer` are read), after checking that no file there is foreign and no two records share
    a name."""
    from gemmascope.common.files import read_json

    names = [output_name(r) for r in records]
    if len(set(names)) < len(names):
        raise ValueError(f"two SAEs would share a SAEBench file name in {folder}; give --sae-id")
    paths = [Path(folder) / kind / name for kind in evals for name in names]
    for path in paths:
        if path.exists():
            try:
                ours = str(read_json(path).get("sae_bench_commit_hash", "")).startswith(
                    "gemmascope"
                )
            except ValueError:
                ours = False
            if not ours:
                raise FileExistsError(
                    f"{path} exists and was not written by gemmascope; choose another "
                    "--saebench-out folder or move the file"
                )
    return paths


def write_saebench(
    folder: str | Path,
    records: list[dict[str, Any]],
    settings: dict[str, Any],
    sae_cfgs: list[dict[str, Any]],
) -> list[Path]:
    """Write each record (evaluated with `details=True`) as SAEBench's result file of each eval it
    holds, `folder/{eval}/{release}_{sae_id}_eval_results.json` (SAEBench's `eval_results` layout),
    atomically; a file of the same name that gemmascope did not write is refused, not replaced."""
    from gemmascope.common.files import write_json

    jobs = []
    writers = {"core": lambda r, cfg: core_output(r, settings, cfg),
               "absorption": lambda r, _: absorption_output(r, settings),
               "sparse_probing": lambda r, _: sparse_probing_output(r, settings),
               "autointerp": lambda r, _: autointerp_output(r, settings)}  # fmt: skip
    for kind in writers:
        # absorption: not for transcoders, nor where too few letters have a probe (no metrics)
        pairs = [(r, cfg) for r, cfg in zip(records, sae_cfgs, strict=True)
                 if r["saebench"].get(kind) is not None and r["saebench"][kind].get("mean") != {}]  # fmt: skip
        paths = saebench_paths(folder, [r for r, _ in pairs], [kind])  # refuses before any write
        jobs += [(kind, path, r, cfg) for path, (r, cfg) in zip(paths, pairs, strict=True)]
    for kind, path, r, cfg in jobs:
        write_json(path, writers[kind](r, cfg))
    written = [path for _, path, _, _ in jobs]
    return written
