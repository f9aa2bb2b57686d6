// The one assertion macro of the plain C++ tests (no test framework: they must build without torch or gtest).
// A failed EXPECT prints where and what, counts, and lets the test go on; main() checks `failures`.
#pragma once
#include <cstdio>

static int failures = 0;

#define EXPECT(cond)                                                           \
  do {                                                                         \
    if (!(cond)) {                                                             \
      std::fprintf(stderr, "%s:%d: FAILED %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                  \
    }                                                                          \
  } while (0)
