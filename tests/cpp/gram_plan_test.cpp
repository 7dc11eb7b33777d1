// Host-compiled checks of csrc/gram/gram_plan.h (the CUDA Gram kernel's data-free logic); built and run by
// tests/test_gram_plan.py.  Prints one line per check group and exits non-zero on the first failure.
//   gram_plan_test choose <variant> <smem_optin>    -> prints the chosen index and its smem bytes
//   gram_plan_test table                            -> prints the config table (index variant bm stages smem)
//   gram_plan_test tiles <n1> <n2> <symmetric> <bm> -> checks the tile map, prints the number of tiles served
//   gram_plan_test chunks <seed>                    -> checks the chunk walk on random layer widths
//   gram_plan_test pipeline <stages> <total>        -> checks the cp.async stage schedule
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "gram/gram_plan.h"

using namespace ntk_fast::gram_plan;

#define CHECK(cond, ...)                   \
  do {                                     \
    if (!(cond)) {                         \
      std::fprintf(stderr, "FAIL: " __VA_ARGS__); \
      std::fprintf(stderr, "\n");          \
      std::exit(1);                        \
    }                                      \
  } while (0)

static int cmd_choose(int variant, long long optin) {
  const int i = choose_config(variant, optin);
  std::printf("%d %lld\n", i, i >= 0 ? static_cast<long long>(smem_bytes(kConfigs[i])) : -1LL);
  return 0;
}

static int cmd_table() {
  for (int i = 0; i < kNumConfigs; ++i)
    std::printf("%d %d %d %d %d %zu\n", i, kConfigs[i].variant, kConfigs[i].bm, kConfigs[i].stages, kConfigs[i].nt,
                smem_bytes(kConfigs[i]));
  return 0;
}

// Every tile (bi, bj) of the output (bi <= bj when symmetric) is served by exactly one block; no block serves a
// tile outside the output.  Large grids: the blocks of a deterministic sample of super tiles are checked to map
// inside the output and to the tile the inverse formula predicts.
static int cmd_tiles(long long n1, long long n2, int symmetric, int bm) {
  const Grid g = grid_for(n1, n2, bm, symmetric != 0);
  CHECK(g.blocks <= 0x7fffffffLL, "too many blocks %lld", g.blocks);
  const long long cells = g.tiles1 * g.tiles2;
  long long served = 0;
  if (cells <= (1LL << 26)) {
    std::vector<unsigned char> hit(static_cast<size_t>(cells), 0);
    for (long long b = 0; b < g.blocks; ++b) {
      int bi, bj;
      if (!map_tile(b, symmetric != 0, (int)g.tiles1, (int)g.tiles2, (int)g.supers2, bi, bj)) continue;
      CHECK(bi >= 0 && bj >= 0 && bi < g.tiles1 && bj < g.tiles2, "block %lld -> (%d, %d) outside", b, bi, bj);
      CHECK(!symmetric || bi <= bj, "block %lld -> (%d, %d) below the diagonal", b, bi, bj);
      unsigned char& h = hit[(size_t)(bi * g.tiles2 + bj)];
      CHECK(h == 0, "tile (%d, %d) served twice (block %lld)", bi, bj, b);
      h = 1;
      ++served;
    }
    for (long long bi = 0; bi < g.tiles1; ++bi)
      for (long long bj = symmetric ? bi : 0; bj < g.tiles2; ++bj)
        CHECK(hit[(size_t)(bi * g.tiles2 + bj)], "tile (%lld, %lld) never served", bi, bj);
  } else {
    // Sample: super tiles s spread over the whole range (first, last and pseudo-random ones).
    std::mt19937_64 rng(12345);
    const long long supers = g.blocks / (kGroup * kGroup);
    for (int t = 0; t < 20000; ++t) {
      const long long s = t == 0 ? 0 : t == 1 ? supers - 1 : static_cast<long long>(rng() % supers);
      long long R, C;
      if (symmetric) {
        R = 0;
        while ((R + 1) * (R + 2) / 2 <= s) ++R;  // row of the lower triangle, by counting (no sqrt)
        C = s - R * (R + 1) / 2;
      } else {
        R = s / g.supers2;
        C = s % g.supers2;
      }
      for (int local = 0; local < kGroup * kGroup; ++local) {
        int bi, bj;
        const bool ok = map_tile(s * kGroup * kGroup + local, symmetric != 0, (int)g.tiles1, (int)g.tiles2,
                                 (int)g.supers2, bi, bj);
        const long long ei = (symmetric ? C : R) * kGroup + local / kGroup;
        const long long ej = (symmetric ? R : C) * kGroup + local % kGroup;
        CHECK(bi == ei && bj == ej, "super tile %lld local %d -> (%d, %d), expected (%lld, %lld)", s, local, bi, bj,
              ei, ej);
        const bool inside = ei < g.tiles1 && ej < g.tiles2 && (!symmetric || ei <= ej);
        CHECK(ok == inside, "super tile %lld local %d: active %d, expected %d", s, local, (int)ok, (int)inside);
        served += ok;
      }
    }
  }
  std::printf("%lld %lld\n", served, g.blocks);
  return 0;
}

// The kernel's walk (iter_init / iter_next) visits, for each layer in order, every chunk of A then every
// chunk of D exactly once, and total_chunks counts them.
static int cmd_chunks(unsigned seed) {
  std::mt19937 rng(seed);
  for (int trial = 0; trial < 2000; ++trial) {
    const int L = 1 + static_cast<int>(rng() % 16);
    const int bk = (rng() % 2) ? 16 : 32;
    int k[16][2];
    for (int l = 0; l < L; ++l)
      for (int p = 0; p < 2; ++p) k[l][p] = 4 * (1 + static_cast<int>(rng() % 300));
    std::vector<int> expect;  // (l, part, kc) packed
    for (int l = 0; l < L; ++l)
      for (int p = 0; p < 2; ++p)
        for (int kc = 0; kc * bk < k[l][p]; ++kc) expect.push_back((l * 2 + p) * 100000 + kc);
    const int total = total_chunks(k, L, bk);
    CHECK(total == (int)expect.size(), "total_chunks %d, expected %zu", total, expect.size());
    ChunkIter it;
    iter_init(it, k, bk);
    for (int c = 0; c < total; ++c) {
      CHECK(it.l < L, "chunk %d: layer %d past L %d", c, it.l, L);
      CHECK(it.nk == chunks_of(k[it.l][it.part], bk), "chunk %d: nk %d", c, it.nk);
      CHECK((it.l * 2 + it.part) * 100000 + it.kc == expect[c], "chunk %d: (%d, %d, %d)", c, it.l, it.part, it.kc);
      CHECK(it.kc * bk < k[it.l][it.part], "chunk %d starts past the width", c);
      iter_next(it, k, L, bk);
    }
    CHECK(it.l == L, "walk did not end after the last layer");
  }
  std::printf("ok\n");
  return 0;
}

// The kernel's schedule: prologue loads chunks 0..S-2 into stages 0..S-2 (one commit group each); iteration
// c waits until at most S-2 groups are pending (so chunk c's group is complete), syncs, loads chunk c+S-1
// into stage (c+S-1) % S, commits, computes on stage c % S.  Checks: chunk c's data is complete when it is
// computed, and a stage is overwritten only by a load issued after the barrier that follows every read of
// its previous chunk (stage (c+S-1) % S = (c-1) % S held chunk c-1, computed in iteration c-1, before this
// iteration's barrier).
static int cmd_pipeline(int S, int total) {
  std::vector<int> stage_chunk(S, -1);  // chunk whose load was last issued into the stage
  std::vector<int> group_of(total, -1);  // commit group index of each chunk's load
  std::vector<int> read_done(S, -1);     // iteration in which the stage was last read
  int groups = 0;
  for (int s = 0; s < S - 1; ++s) {
    if (s < total) {
      stage_chunk[s] = s;
      group_of[s] = groups;
    }
    ++groups;
  }
  for (int c = 0; c < total; ++c) {
    // cp.async.wait_group(S-2): all groups but the newest S-2 are complete.
    const int complete_upto = groups - (S - 2);  // groups [0, complete_upto) complete
    CHECK(group_of[c] >= 0 && group_of[c] < complete_upto, "chunk %d not complete when computed", c);
    // __syncthreads() here: every read issued in iterations < c is finished.
    const int nc = c + S - 1;
    if (nc < total) {
      const int st = nc % S;
      CHECK(read_done[st] < c, "stage %d overwritten before its last read finished", st);
      CHECK(stage_chunk[st] < 0 || stage_chunk[st] <= c - 1, "stage %d still holds an unread chunk %d", st,
            stage_chunk[st]);
      stage_chunk[st] = nc;
      group_of[nc] = groups;
    }
    ++groups;
    const int st = c % S;
    CHECK(stage_chunk[st] == c, "iteration %d computes stage %d holding chunk %d", c, st, stage_chunk[st]);
    read_done[st] = c;
  }
  std::printf("ok\n");
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  if (!std::strcmp(argv[1], "choose") && argc == 4) return cmd_choose(std::atoi(argv[2]), std::atoll(argv[3]));
  if (!std::strcmp(argv[1], "table")) return cmd_table();
  if (!std::strcmp(argv[1], "tiles") && argc == 6)
    return cmd_tiles(std::atoll(argv[2]), std::atoll(argv[3]), std::atoi(argv[4]), std::atoi(argv[5]));
  if (!std::strcmp(argv[1], "chunks") && argc == 3) return cmd_chunks(static_cast<unsigned>(std::atoi(argv[2])));
  if (!std::strcmp(argv[1], "pipeline") && argc == 4) return cmd_pipeline(std::atoi(argv[2]), std::atoi(argv[3]));
  std::fprintf(stderr, "usage: see the header comment\n");
  return 2;
}
