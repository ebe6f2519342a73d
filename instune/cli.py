"""`instune SUBCOMMAND CONFIG [--set KEY=VALUE ...]`: one subcommand per stage, `run` for all of them.

User mistakes (UserError) print one line and exit 2, with no traceback; a run stuck waiting for resources
that cannot come exits 3 after one line (instune/ray_waits.py).
"""

from __future__ import annotations

import argparse
import sys

from instune.errors import UserError


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="instune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [("prepare", "read, filter, mix, tokenize and pack the data"),
                            ("train", "fine-tune on the prepared data with Ray Train"),
                            ("eval", "evaluate a model on the configured eval sets"),
                            ("run", "prepare, evaluate the base model, train, evaluate the tuned model"),
                            ("sweep", "search data mixes and tuning settings with Ray Tune (resumes if interrupted)"),
                            ("vlm", "image-text: prepare, evaluate, train, evaluate again; the in/out-of-domain table "
                                    "(a VLM config, configs/vlm_quickstart.yaml)")]:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="experiment YAML file")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value by dotted path, e.g. --set train.lr=2e-4")
        p.add_argument("-v", "--verbose", action="store_true",
                       help="show Ray's own log lines on the console too (always in OUTPUT_DIR/logs/ray.log)")
        p.add_argument("--join", action="store_true",
                       help="run on the Ray cluster started on this machine with `ray start` (default: start a "
                            "private one; RAY_ADDRESS always joins the cluster it names)")
        if name == "eval":
            p.add_argument("--model", help="model or PEFT adapter directory to evaluate (default: the run's "
                                           "merged model); an adapter loads on the config's base model")
    chat = sub.add_parser("chat", help="talk to a model or tuned adapter, or answer a JSONL file of prompts")
    chat.add_argument("model", help="merged model or PEFT adapter: a directory, a Hub id or s3:// / gs:// URI")
    chat.add_argument("--prompts", help="JSONL of prompts to answer instead of talking (see instune/chat.py)")
    chat.add_argument("--output", help="where to write the answered prompts as JSONL (default: stdout)")
    chat.add_argument("--config", help="experiment YAML whose model and chat sections apply")
    chat.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a model.* or chat.* setting, e.g. --set chat.max_new_tokens=512")
    from instune.ray_jobs import add_job_commands

    add_job_commands(sub)
    return parser.parse_args(argv)


def dispatch(args) -> int | None:
    if args.command in ("submit", "jobs"):
        from instune.ray_jobs import dispatch_job_command

        return dispatch_job_command(args)
    if args.command == "chat":
        from instune.chat import chat_command, trained_markers
        from instune.config import load_chat_config
        from instune.stages import eval_prompt_marker

        model_config, chat_config, experiment = load_chat_config(args.config, args.overrides)
        # The prompts carry the success marker exactly when eval's would (eval.outcome_marker); without a config,
        # when the model directory records that training used markers (train/export.py).
        markers = eval_prompt_marker(experiment) if experiment is not None else trained_markers(args.model)
        return chat_command(args.model, model_config, chat_config, args.prompts, args.output, markers)
    from instune import ray_runtime, stages
    from instune.config import load_config

    ray_runtime.options = ray_runtime.RayOptions(join=args.join, verbose=args.verbose)
    if args.command == "vlm":
        from instune.config import VlmExperimentConfig
        from instune.storage import is_uri
        from instune.vlm_run import run_vlm

        vlm_config = load_config(args.config, args.overrides, schema=VlmExperimentConfig)
        if is_uri(vlm_config.output_dir):  # vlm_run writes with local paths; it does not publish to buckets
            raise UserError(f"{args.config}: output_dir: {vlm_config.output_dir} is a URI; instune vlm writes to a "
                            f"local or mounted path")
        run_vlm(vlm_config)
        return 0
    config = load_config(args.config, args.overrides)
    if args.command == "prepare":
        stages.prepare_stage(config)
    elif args.command == "train":
        outputs = stages.train_stage(config)
        report = stages.write_report_for(config, stages.output_paths(config)["train"], f"{config.name}: training",
                                         metrics_file=outputs.metrics_file)
        merged = stages.published(config, outputs.merged_dir) if outputs.merged_dir else None
        print(f"adapter: {stages.published(config, outputs.adapter_dir)}\nmerged model: {merged}\n"
              f"report: {stages.published(config, report)}")
    elif args.command == "eval":
        stages.eval_report_stage(config, args.model)
    elif args.command == "run":
        stages.run_all(config)
    elif args.command == "sweep":
        stages.sweep_stage(config)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from instune import ray_waits

    try:
        exit_code = dispatch(args)
    except UserError as e:
        print(f"instune: error: {e}", file=sys.stderr)
        return 2
    except BaseException:
        # ray_waits interrupts (KeyboardInterrupt) a run that waits for resources that cannot come, after
        # printing its line; Ray Train then aborts its run, which may raise anything, or exit.
        if ray_waits.stuck() is None:
            raise
        return 3
    # Tune takes the interrupt as a request to end the sweep early, and returns.
    return 3 if ray_waits.stuck() is not None else exit_code or 0


if __name__ == "__main__":
    sys.exit(main())
