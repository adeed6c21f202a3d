r"""L2P, DualPrompt and CODA-Prompt against the papers' baselines (rehearsal included) on the
embedded digits benchmark.

  python -m demo.compare                      # 9 methods x seeds 0, 1, 2
  python -m demo.compare --seeds 0 --methods l2p ft_seq

Runs each method's digits config (`configs/digits_<method>.py`, all from the shipped
glyph-pretrained ViT) once per seed (`config.seed`: head, prompts, data order) in
`<workdir>/<method>/seed<s>` (a finished run of the same config found there is reused, anything
else there is replaced), then prints
avg_acc and forgetting as mean +- standard deviation over the seeds and writes the table to
`<workdir>/table.md` and the numbers to `<workdir>/comparison.json`.
"""

import argparse
import importlib
import json
import os
import shutil
import time

import numpy as np

# Method key -> (row label, config module).
METHODS = {
    'ft_seq': ('FT-seq (lower bound)', 'configs.digits_ft_seq'),
    'ft_frozen': ('FT-seq-frozen', 'configs.digits_ft_frozen'),
    'l2p': ('L2P', 'configs.digits_l2p'),
    'dualprompt': ('DualPrompt', 'configs.digits_dualprompt'),
    'coda': ('CODA-Prompt', 'configs.digits_coda'),
    'er10': ('ER, buffer 10 per class', 'configs.digits_er10'),
    'er50': ('ER, buffer 50 per class', 'configs.digits_er50'),
    'l2p_replay': ('L2P, buffer 10 per class', 'configs.digits_l2p_replay'),
    'joint': ('joint training (upper bound)', 'configs.digits_joint'),
}
METRICS = ('avg_acc', 'forgetting')


def _finished(workdir: str, config) -> dict | None:
  """The results.json of a finished run of `config` in `workdir`, else None."""
  try:
    with open(os.path.join(workdir, 'results.json')) as f:
      doc = json.load(f)
  except (OSError, ValueError):
    return None
  return doc if doc.get('config') == json.loads(config.to_json_best_effort()) else None


def run_one(method: str, seed: int, workdir: str) -> dict[str, float]:
  """Final metrics (%) of `method` with `seed`: a finished run in `workdir`, or a new one there.

  Joint training is one task: its forgetting is NaN.
  """
  # Imported here: `--help` should not wait for JAX and TensorFlow.
  import train_continual  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(METHODS[method][1]).get_config()
  config.seed = seed
  results = _finished(workdir, config)
  if results is None:
    shutil.rmtree(workdir, ignore_errors=True)
    results = train_continual.train_and_evaluate(config, workdir)
  return {k: float(results.get(k, np.nan)) for k in METRICS}


def compare(methods, seeds, workdir: str, log=print) -> dict[str, dict[str, list[float]]]:
  """Runs every method with every seed; returns {method: {metric: [value per seed]}}."""
  table = {}
  for method in methods:
    table[method] = {k: [] for k in METRICS}
    for seed in seeds:
      start = time.time()
      metrics = run_one(method, seed, os.path.join(workdir, method, f'seed{seed}'))
      for k in METRICS:
        table[method][k].append(metrics[k])
      log(f'{METHODS[method][0]}, seed {seed}: avg_acc {metrics["avg_acc"]:.2f}, '
          f'forgetting {metrics["forgetting"]:.2f} ({time.time() - start:.0f} s)', flush=True)
  return table


def format_table(table: dict[str, dict[str, list[float]]], seeds) -> str:
  """Markdown table: avg_acc and forgetting, mean +- population standard deviation."""
  lines = ['| method | avg_acc (%) | forgetting (%) |',
           '|---|---|---|']
  for method, values in table.items():
    cells = ['-' if np.isnan(values[k]).any() else f'{np.mean(values[k]):.2f} +- {np.std(values[k]):.2f}'
             for k in METRICS]
    lines.append(f'| {METHODS[method][0]} | ' + ' | '.join(cells) + ' |')
  lines.append(f'\nSeeds {", ".join(str(s) for s in seeds)}; '
               'mean +- standard deviation over the seeds.')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  parser.add_argument('--methods', nargs='+', choices=list(METHODS), default=list(METHODS))
  parser.add_argument('--workdir', default='runs/compare')
  args = parser.parse_args()
  # Keep each run's log to warnings: the comparison prints one line per run.
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  table = compare(args.methods, args.seeds, args.workdir)
  text = format_table(table, args.seeds)
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, 'table.md'), 'w') as f:
    f.write(text + '\n')
  with open(os.path.join(args.workdir, 'comparison.json'), 'w') as f:
    json.dump({'seeds': args.seeds, 'results': table}, f, indent=2)  # NaN: no value
  print('\n' + text)


if __name__ == '__main__':
  main()
