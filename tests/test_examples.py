"""The scripts in docs/examples run as a user runs them and print what they promise."""
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join([str(ROOT / 'src'), os.environ.get('PYTHONPATH', '')]))
  env.pop('XLA_FLAGS', None)   # the script itself asks for 8 CPU devices
  done = subprocess.run([sys.executable, str(ROOT / 'docs' / 'examples' / script), *args],
                        capture_output=True, text=True, env=env, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return done


def test_train_mlp_loss_goes_down():
  out = _run('train_mlp.py', '--epochs', '3').stdout
  assert out.startswith('8 devices, 16 batches of 8 x 32 examples per epoch')
  losses = [float(v) for v in re.findall(r'^epoch +\d+ +loss ([0-9.]+)$', out, re.M)]
  assert len(losses) == 3
  assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_lif_network_prints_spike_counts_per_population():
  done = _run('lif_network.py', '--steps', '300', '--neurons', '50')
  lines = re.findall(r'^population (\d+): drive ([0-9.]+) +spikes +(\d+) +rate +([0-9.]+) Hz',
                     done.stdout, re.M)
  assert [int(p) for p, *_ in lines] == list(range(8))
  drives = [float(d) for _, d, _, _ in lines]
  spikes = [int(s) for _, _, s, _ in lines]
  assert drives == sorted(drives) and drives[0] < drives[-1]
  assert spikes[-1] > spikes[0] > 0          # a stronger drive makes more spikes
  rates = [float(r) for *_, r in lines]
  assert all(abs(r - s / 50 / 0.03) < 0.1 for r, s in zip(rates, spikes))
  assert '300/300' in done.stderr            # the progress bar reached the end
