// The tile-packed symmetric layout of Theta (mirror: ntk_fast/ops/packed.py).  With tile edge T and
// nt = ceil(n / T) tile rows, the tiles (bi, bj) with bi <= bj are stored one after the other in row-major
// order of (bi, bj); each tile is a dense T x T row-major block (diagonal tiles hold the full symmetric
// block, edge tiles are zero-padded).  The Python side always packs with T = kPackedTile, on every device.
#pragma once
#include <cstdint>

namespace ntk_fast {

constexpr int64_t kPackedTile = 64;

inline int64_t packed_tiles_per_side(int64_t n, int64_t T) { return (n + T - 1) / T; }
inline int64_t packed_size(int64_t n, int64_t T) {
  const int64_t nt = packed_tiles_per_side(n, T);
  return nt * (nt + 1) / 2 * T * T;
}
inline int64_t packed_tile_index(int64_t bi, int64_t bj, int64_t nt) { return bi * nt - bi * (bi - 1) / 2 + (bj - bi); }

}  // namespace ntk_fast
