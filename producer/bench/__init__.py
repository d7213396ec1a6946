"""`shardgen bench`: what shardgen's pieces cost, measured as ratios in one run, on this machine.

    shardgen bench engine     the engine against transformers' generate on the same prompts (plain `shardgen bench`)
    shardgen bench submit     submit rows/s, Redis bytes per row and shard, `status --json` latency
    shardgen bench fleet      shards/s and control-plane CPU per shard through N real worker processes
    shardgen bench queue      the same job embedded and through submit + one worker: what the queue costs
    shardgen bench quant      each quantization method: load time, memory, tokens/s, perplexity

Each subcommand lives in its own module and imports what it measures lazily, so `shardgen --help` stays fast.
Benchmarks use the same public pieces a user's code does (load_generator, run_embedded, submit_run, real
`shardgen worker` processes); nothing in the product exists only for them.
"""

from __future__ import annotations

import importlib

import click

SUBCOMMANDS = {
    "engine": "shardgen.producer.bench.engine:bench",
    "submit": "shardgen.producer.bench.submit:bench_submit",
    "fleet": "shardgen.producer.bench.fleet:bench_fleet",
    "queue": "shardgen.producer.bench.queue:bench_queue",
    "quant": "shardgen.producer.bench.quant:bench_quant",
}
DEFAULT = "engine"


class BenchGroup(click.Group):
    """A group whose subcommands load on first use, and where `shardgen bench [OPTIONS]` means `bench engine`."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in SUBCOMMANDS:
            return None
        module, attribute = SUBCOMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attribute)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in SUBCOMMANDS and args[0] not in ("-h", "--help")):
            args = [DEFAULT, *args]
        return super().parse_args(ctx, args)


@click.group("bench", cls=BenchGroup)
def bench() -> None:
    """Measure shardgen on this machine: `bench engine` (the default), `bench submit`, `bench fleet`,
    `bench queue`, `bench quant`. Each prints a table (or --json) of ratios measured in one run."""
