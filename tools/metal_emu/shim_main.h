// shim_main.h: the launcher half of the shims (file I/O, guarded buffers,
// the loop over threadgroups). Included once, by the generated program.
#pragma once
#include <sys/mman.h>
#include <unistd.h>

#include <string>

#include "emu_runtime.h"

namespace emu {

inline size_t page_size() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

void* guarded_buffer(size_t nbytes) {
  const size_t ps = page_size();
  const size_t body = (nbytes + ps - 1) / ps * ps;
  char* base = static_cast<char*>(mmap(nullptr, body + ps, PROT_READ | PROT_WRITE,
                                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (base == MAP_FAILED) fail("mmap failed");
  if (mprotect(base + body, ps, PROT_NONE) != 0) fail("mprotect failed");
  return base + body - nbytes;
}

static std::vector<char> read_file(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) fail(("cannot open " + path).c_str());
  std::vector<char> data;
  char chunk[1 << 16];
  size_t got;
  while ((got = std::fread(chunk, 1, sizeof(chunk), f)) > 0)
    data.insert(data.end(), chunk, chunk + got);
  std::fclose(f);
  return data;
}

int run_main(int argc, char** argv, void (*const* bodies)(Lane&), int n_bodies) {
  if (argc < 10) fail("usage: kernel gx gy gz tx ty tz flags nbuf buffers...");
  const int which = std::atoi(argv[1]);
  if (which < 0 || which >= n_bodies) fail("kernel index out of range");
  Dispatch& d = dispatch();
  const int flags = std::atoi(argv[8]);
  const bool reverse = flags & 1, whole_blocks = flags & 2;
  for (int i = 0; i < 3; i++) {
    d.grid[i] = static_cast<uint>(std::atol(argv[2 + i]));
    uint tg = std::max(1u, static_cast<uint>(std::atol(argv[5 + i])));
    d.group[i] = whole_blocks ? tg : std::min(tg, d.grid[i]);  // Metal clamps to the grid
    d.groups[i] = (d.grid[i] + d.group[i] - 1) / d.group[i];
  }
  const int nbuf = std::atoi(argv[9]);
  if (argc != 10 + nbuf) fail("buffer count does not match the arguments");
  struct Out { void* ptr; size_t n; std::string path; };
  std::vector<Out> outs;
  for (int i = 0; i < nbuf; i++) {
    std::string a = argv[10 + i];
    if (a.rfind("i:", 0) == 0) {
      std::vector<char> data = read_file(a.substr(2));
      void* p = guarded_buffer(data.size());
      std::memcpy(p, data.data(), data.size());
      d.buffers.push_back(p);
    } else if (a.rfind("o:", 0) == 0) {
      size_t colon = a.rfind(':');
      size_t n = std::strtoull(a.c_str() + colon + 1, nullptr, 10);
      void* p = guarded_buffer(n);
      std::memset(p, 0xff, n);  // NaN / all-ones: unwritten outputs show
      d.buffers.push_back(p);
      outs.push_back({p, n, a.substr(2, colon - 2)});
    } else {
      fail("buffer argument must start with i: or o:");
    }
  }
  Scheduler s;
  s.body = bodies[which];
  s.reverse = reverse;
  for (uint gz = 0; gz < d.groups.z; gz++)
    for (uint gy = 0; gy < d.groups.y; gy++)
      for (uint gx = 0; gx < d.groups.x; gx++) {
        d.cur_group = {gx, gy, gz};
        for (int i = 0; i < 3; i++)
          d.cur_size[i] = whole_blocks ? d.group[i]
                                       : std::min(d.group[i], d.grid[i] - d.cur_group[i] * d.group[i]);
        const vec<uint, 3> sz = d.cur_size;
        s.lanes.assign(sz.x * sz.y * sz.z, Lane());
        uint flat = 0;
        for (uint z = 0; z < sz.z; z++)
          for (uint y = 0; y < sz.y; y++)
            for (uint x = 0; x < sz.x; x++, flat++) {
              Lane& l = s.lanes[flat];
              l.tid = {x, y, z};
              l.tgid = d.cur_group;
              l.flat = flat;
              l.lane = flat % kSimdWidth;
              l.simd = flat / kSimdWidth;
            }
        s.run_group();
      }
  for (const Out& o : outs) {
    FILE* f = std::fopen(o.path.c_str(), "wb");
    if (!f || std::fwrite(o.ptr, 1, o.n, f) != o.n) fail("cannot write output");
    std::fclose(f);
  }
  return 0;
}

}  // namespace emu
