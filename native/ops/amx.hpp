// AMX tile registers, shared by the kernels that use them (linear.cpp for bf16 weights,
// linear_quant.cpp for quantized ones): whether this process may use them, the instructions, and
// the one tile configuration each thread has loaded.
//
// The instructions are inline assembly with memory clobbers: GCC 12's AMX intrinsics do not tell the
// compiler that they read and write memory (its ldtilecfg let it drop the stores that fill the
// configuration in llama.cpp's build).
#pragma once

#include <cpuid.h>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <sys/syscall.h>
#include <unistd.h>

namespace llaisys::ops::amx {

#define LLAISYS_TILE_ZERO(t) asm volatile("tilezero %%tmm" #t ::: "memory")
#define LLAISYS_TILE_LOAD(t, p, stride) asm volatile("tileloadd (%0,%1,1), %%tmm" #t ::"r"(p), "r"(int64_t(stride)) : "memory")
#define LLAISYS_TILE_STORE(t, p, stride) asm volatile("tilestored %%tmm" #t ", (%0,%1,1)" ::"r"(p), "r"(int64_t(stride)) : "memory")
// c += a . b: signed bytes, 4 k a 32-bit lane; bf16, 2 k a lane.
#define LLAISYS_TILE_DOT_S8(c, a, b) asm volatile("tdpbssd %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::: "memory")
#define LLAISYS_TILE_DOT_BF16(c, a, b) asm volatile("tdpbf16ps %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::: "memory")

// Rows and bytes per row of each of the 8 tile registers (palette 1); 0 leaves one unused.
struct alignas(64) Config {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t bytes_per_row[16] = {};
    uint8_t rows[16] = {};
    void set(int tile, int n_rows, int bytes) {
        rows[tile] = static_cast<uint8_t>(n_rows);
        bytes_per_row[tile] = static_cast<uint16_t>(bytes);
    }
};
static_assert(sizeof(Config) == 64, "ldtilecfg reads 64 bytes");

// Which AMX parts the CPU has, and that Linux lets this process use the tile registers (they must be
// asked for). LLAISYS_NO_AMX=1 says no, to compare the paths.
struct Support {
    bool int8 = false, bf16 = false;
};

inline Support support() {
    static const Support found = [] {
        Support s;
        unsigned a, b, c, d;
        if (std::getenv("LLAISYS_NO_AMX") || !__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24))) return s;
        constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
        if (syscall(SYS_arch_prctl, kRequestPermission, kTileData) != 0) return s;
        s.bf16 = d & (1u << 22);
        s.int8 = d & (1u << 25);
        return s;
    }();
    return found;
}

// Loads `config` unless it is what this thread has loaded already; nothing else in the process uses
// tiles, so the thread's last configuration is still in place.
inline void configure(const Config& config) {
    thread_local Config loaded{};
    thread_local bool any = false;
    if (any && std::memcmp(&loaded, &config, sizeof config) == 0) return;
    asm volatile("ldtilecfg %0" ::"m"(config) : "memory");
    loaded = config;
    any = true;
}

}  // namespace llaisys::ops::amx
