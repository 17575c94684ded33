"""Test scripts on N fake CPU devices. XLA_FLAGS must be set before jax is imported, so such a script runs in
a fresh interpreter; it prints "ok" as its last line when every check in it passed."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_env(n_devices: int) -> dict:
  """The environment of a process with `n_devices` CPU devices (other XLA flags of this process kept)."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={n_devices}"]))


def run_script(script: str, n_devices: int = 8, timeout: float = 900, env: dict | None = None) -> str:
  """Runs `script` (python source) on `n_devices` fake CPU devices (or in `env`); asserts that it exited 0
  with "ok" last and returns its stdout (also printed, so pytest shows it on failure)."""
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env or cpu_env(n_devices),
                        capture_output=True, text=True, timeout=timeout)
  print(proc.stdout)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-4000:]
  return proc.stdout
