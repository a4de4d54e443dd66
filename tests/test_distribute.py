"""MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1 train as one process.

MirroredStrategy (one process, several replicas) is tested in
``test_layers.py``; this runs ``tests/multi_worker_check.py`` as two workers
of one cluster (free ports on 127.0.0.1 only), a few steps on the same global
batches, and compares their weights with each other and with single-process
training, for both offset learners.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import tensorflow as tf

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import multi_worker_check as check  # noqa: E402


def _free_ports(n):
  sockets = []
  for _ in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    sockets.append(s)
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


class MultiWorkerTest(tf.test.TestCase):
  def test_two_workers_match_one_process(self):
    cluster = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    outs, procs = [], []
    for index in range(2):
      out = os.path.join(self.get_temp_dir(), f"worker{index}.npz")
      env = dict(os.environ)
      env["TF_CONFIG"] = json.dumps(
        {"cluster": {"worker": cluster}, "task": {"type": "worker", "index": index}}
      )
      env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
      env["CUDA_VISIBLE_DEVICES"] = ""
      env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
      procs.append(
        subprocess.Popen(
          [sys.executable, os.path.join(HERE, "multi_worker_check.py"), "--out", out],
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
          env=env,
        )
      )
      outs.append(out)
    try:
      results = [p.communicate(timeout=240) for p in procs]
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
    for p, (_, err) in zip(procs, results, strict=True):
      self.assertEqual(p.returncode, 0, err[-3000:])
    workers = [dict(np.load(out)) for out in outs]
    self.assertEqual(int(workers[0]["num_replicas"]), 2)
    for learner in check.LEARNERS:
      want = check.train_single(learner)
      self.assertNotEmpty(want)
      for key, value in want.items():
        a = workers[0][f"{learner}/{key}"]
        b = workers[1][f"{learner}/{key}"]
        self.assertAllEqual(a, b, msg=f"{learner} weight {key}: workers differ")
        self.assertAllClose(a, value, atol=1e-5, msg=f"{learner} weight {key}")
      # Training moved the weights (the comparison is not of initial values).
      init = check.build_model(learner).get_weights()
      moved = [not np.allclose(w, want[str(i)]) for i, w in enumerate(init)]
      self.assertGreater(sum(moved), len(init) // 2)


if __name__ == "__main__":
  tf.test.main()
