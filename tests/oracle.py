"""A NumPy oracle of epitome sampling for the tests: the formula, entry by entry.

docs/design.md, written as a plain loop over kernel entries with no
vectorisation and no shared code with :mod:`keras_epitome.sampling`, so that
the package's samplers (training, frozen, factored, compression) are checked
against an independent reading of the math.
"""

import math

import numpy as np

from keras_epitome.geometry import EpitomeGeometry, RoutingMap


def sample_kernel(epitome, routing: RoutingMap, geometry: EpitomeGeometry):
  """Reference sampler: a plain loop over kernel entries, straight from the formula.

  Slow; for tests and for checking other forms. Offsets are read as in
  :func:`sample_kernel` (channel offsets wrap, spatial offsets clip).
  """
  g = geometry
  e = np.asarray(epitome, dtype=np.float64)
  kernel = np.zeros(g.kernel_shape, dtype=np.float64)
  # Output chunk b reads the epitome's input channels rolled by b * channel_roll.
  rolls = [(b * g.channel_roll) % g.cin_e for b in range(g.num_out_chunks)]

  def channel_taps_1(offset, pos, size):
    n = math.floor(offset)
    f = offset - n
    return [((pos + n) % size, 1.0 - f), ((pos + n + 1) % size, f)]

  def spatial_taps_1(offset, s, slack):
    o = min(max(float(offset), 0.0), float(slack))
    if slack == 0:
      return [(s, 1.0)]
    n = min(math.floor(o), slack - 1)
    f = o - n
    return [(s + n, 1.0 - f), (s + n + 1, f)]

  for idx in np.ndindex(*g.kernel_shape):
    *s, ci, co = idx
    a, u = divmod(ci, g.cin_e)
    b, v = divmod(co, g.cout_e)
    in_taps = channel_taps_1(float(routing.in_offsets[a]), u + rolls[b], g.cin_e)
    out_taps = channel_taps_1(float(routing.out_offsets[b]), v, g.cout_e)
    sp_taps = [
      spatial_taps_1(
        routing.spatial_offsets[b][d] if g.slack[d] else 0.0, s[d], g.slack[d]
      )
      for d in range(g.rank)
    ]
    total = 0.0
    for sp in np.ndindex(*([2] * g.rank)) if g.rank else [()]:
      sw = 1.0
      sidx = []
      for d, t in enumerate(sp):
        taps = sp_taps[d]
        if t >= len(taps):
          sw = 0.0
          break
        sidx.append(taps[t][0])
        sw *= taps[t][1]
      if sw == 0.0:
        continue
      for ii, iw in in_taps:
        for oo, ow in out_taps:
          total += sw * iw * ow * e[tuple(sidx) + (ii, oo)]
    kernel[idx] = total
  return kernel
