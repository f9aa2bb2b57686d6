// How multi_tensor_apply (multi_tensor_apply.cuh) cuts a list of tensors into launches: host-only and
// torch-independent, so csrc/test can check it without a GPU.
//
// Every non-empty tensor is cut into chunks of chunk_size elements; each chunk becomes one block. A launch holds at
// most max_tensors tensor slots and max_blocks blocks. When a launch fills up in the middle of a tensor, that
// tensor is carried over into slot 0 of the next launch.
#pragma once
#include <cstddef>
#include <cstdint>

namespace pyperf {
namespace mta {

// set_slot(slot, tensor_index): put tensor `tensor_index` of the caller's list into `slot` of the next launch.
// add_block(block, slot, chunk): block number `block` of the next launch works on chunk `chunk` of `slot`.
// launch(nblocks): run the launch built so far. Returns the total number of blocks.
template <typename SetSlot, typename AddBlock, typename Launch>
int64_t plan_launches(const int64_t* numels, size_t count, int64_t chunk_size, int max_tensors, int max_blocks,
                      SetSlot&& set_slot, AddBlock&& add_block, Launch&& launch) {
  int nt = 0, nb = 0;
  int64_t total = 0;
  for (size_t i = 0; i < count; ++i) {
    const int64_t n = numels[i];
    if (n <= 0) continue;
    set_slot(nt, i);
    ++nt;
    const int64_t chunks = (n + chunk_size - 1) / chunk_size;
    for (int64_t c = 0; c < chunks; ++c) {
      add_block(nb, nt - 1, c);
      ++nb;
      const bool last_chunk = c == chunks - 1;
      if (nb == max_blocks || (nt == max_tensors && last_chunk)) {
        launch(nb);
        total += nb;
        nb = 0;
        if (last_chunk) {
          nt = 0;
        } else {  // the tensor goes on in the next launch, as its slot 0
          set_slot(0, i);
          nt = 1;
        }
      }
    }
  }
  if (nb > 0) {
    launch(nb);
    total += nb;
  }
  return total;
}

}  // namespace mta
}  // namespace pyperf
