// The launch plan of multi_tensor_apply (pyperf/mta_plan.h), simulated on the host: every chunk of every non-empty
// tensor runs exactly once, in list order, each launch stays within its tensor-slot and block limits, and every
// block's slot holds the right tensor when the launch runs.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <utility>
#include <vector>

#include "pyperf/mta_plan.h"

#include "expect.h"

static void check(const std::vector<int64_t>& numels, int64_t chunk, int max_tensors, int max_blocks) {
  std::vector<std::pair<size_t, int64_t>> want, got;
  for (size_t i = 0; i < numels.size(); ++i)
    for (int64_t c = 0; c * chunk < numels[i]; ++c) want.emplace_back(i, c);

  std::vector<long> slot(max_tensors, -1);
  std::vector<std::pair<int, int64_t>> blocks(max_blocks, {-1, -1});
  int max_slot_used = -1, expected_block = 0, launches = 0;
  const int64_t total = pyperf::mta::plan_launches(
      numels.data(), numels.size(), chunk, max_tensors, max_blocks,
      [&](int s, size_t i) {
        EXPECT(s >= 0 && s < max_tensors);
        EXPECT(numels[i] > 0);
        slot[s] = static_cast<long>(i);
        if (s > max_slot_used) max_slot_used = s;
      },
      [&](int b, int s, int64_t c) {
        EXPECT(b == expected_block && b < max_blocks);
        EXPECT(s >= 0 && s <= max_slot_used);
        ++expected_block;
        blocks[b] = {s, c};
        got.emplace_back(static_cast<size_t>(slot[s]), c);  // the tensor the slot holds at launch time
      },
      [&](int nb) {
        EXPECT(nb == expected_block && nb >= 1 && nb <= max_blocks);
        for (int b = 0; b < nb; ++b) {  // slots must not have been overwritten since the block was added
          const auto& gb = got[got.size() - nb + b];
          EXPECT(static_cast<long>(gb.first) == slot[blocks[b].first]);
          const int64_t n = numels[gb.first];
          EXPECT(blocks[b].second * chunk < n);
        }
        expected_block = 0;
        max_slot_used = -1;
        ++launches;
        for (auto& s : slot) s = -2;  // a new launch must set every slot it uses
      });
  EXPECT(total == static_cast<int64_t>(want.size()));
  EXPECT(got == want);
  (void)launches;
}

int main() {
  check({}, 16, 4, 8);
  check({0, 0, 0}, 16, 4, 8);
  check({1}, 16, 4, 8);
  check({16, 17, 0, 1, 33}, 16, 2, 3);
  check({1000}, 16, 1, 1);       // one tensor, one block per launch: carried over every time
  check({1000, 5, 1000}, 16, 2, 7);
  // many small tensors: the slot limit triggers the launches
  check(std::vector<int64_t>(300, 3), 16, 64, 416);
  // random lists against the real limits and random small ones
  std::srand(12345);
  for (int trial = 0; trial < 300; ++trial) {
    std::vector<int64_t> numels(std::rand() % 200);
    for (auto& n : numels) n = (std::rand() % 5 == 0) ? 0 : std::rand() % 3000;
    const int max_tensors = 1 + std::rand() % 70, max_blocks = 1 + std::rand() % 500;
    check(numels, 16 * (1 + std::rand() % 8), max_tensors, max_blocks);
  }
  if (failures) {
    std::fprintf(stderr, "%d failure(s)\n", failures);
    return 1;
  }
  std::puts("test_mta_plan: ok");
  return 0;
}
