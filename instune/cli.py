"""`instune SUBCOMMAND CONFIG [--set KEY=VALUE ...]`: one subcommand per stage, `run` for all of them.

User mistakes (UserError) print one line and exit 2, with no traceback.
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
                            ("sweep", "search data mixes and tuning settings with Ray Tune (resumes if interrupted)")]:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="experiment YAML file")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value by dotted path, e.g. --set train.lr=2e-4")
        if name == "eval":
            p.add_argument("--model", help="model or PEFT adapter directory to evaluate (default: the run's "
                                           "merged model); an adapter loads on the config's base model")
    from instune.jobs import add_job_commands

    add_job_commands(sub)
    return parser.parse_args(argv)


def dispatch(args) -> int | None:
    if args.command in ("submit", "jobs"):
        from instune.jobs import dispatch_job_command

        return dispatch_job_command(args)
    from instune import stages
    from instune.config import load_config

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
    try:
        exit_code = dispatch(args)
    except UserError as e:
        print(f"instune: error: {e}", file=sys.stderr)
        return 2
    return exit_code or 0


if __name__ == "__main__":
    sys.exit(main())
