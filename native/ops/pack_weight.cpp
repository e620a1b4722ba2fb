// Repacking weights into the kernels' panels (layouts in panels.hpp), from any float or quantized
// source: float panels take the values (dequantized if need be), quantized panels take the blocks'
// integers and scales unchanged, or quantize the values first when the type changes.
#include <cstring>
#include <string>

#include "../ops.hpp"
#include "../quant.hpp"
#include "panels.hpp"

namespace llaisys::ops {
namespace {

int64_t n_panels(int64_t rows) { return (rows + kPanel - 1) / kPanel; }
int64_t n_groups(int64_t rows) { return (n_panels(rows) + kGroup - 1) / kGroup; }

Tensor pack_float(const Tensor& w, DType dtype) {
    const int64_t n_out = w.size(0), n_in = w.size(1);
    Tensor panels = dtype == DType::BF16 ? zeros_on_huge_pages({n_groups(n_out), (n_in + 1) / 2, kGroup, kPanel, 2}, dtype)
                                         : zeros_on_huge_pages({n_groups(n_out), n_in, kGroup, kPanel}, dtype);
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < n_panels(n_out); ++p) {
        std::vector<float> row(n_in);
        const int64_t group_offset = (p / kGroup) * panels.strides[0];
        for (int64_t lane = 0; lane < kPanel && p * kPanel + lane < n_out; ++lane) {
            const int64_t r = p * kPanel + lane;
            if (dtype == DType::BF16) {
                // element (r, k) sits at [group][k / 2][p % kGroup][lane][k % 2]
                uint16_t* dst = panels.data<uint16_t>() + group_offset + (p % kGroup) * kPanel * 2 + lane * 2;
                auto at = [&](int64_t k) -> uint16_t& { return dst[(k / 2) * kGroup * kPanel * 2 + k % 2]; };
                if (w.dtype == DType::BF16) {  // copy the bits: no double rounding
                    auto src = reinterpret_cast<const uint16_t*>(w.row(r));
                    for (int64_t k = 0; k < n_in; ++k) at(k) = src[k];
                } else {
                    quant::dequantize_row(w.dtype, w.row(r), row.data(), n_in);
                    for (int64_t k = 0; k < n_in; ++k) at(k) = f32_to_bf16(row[k]);
                }
            } else {
                // element (r, k) sits at [group][k][p % kGroup][lane]
                float* dst = panels.data<float>() + group_offset + (p % kGroup) * kPanel + lane;
                quant::dequantize_row(w.dtype, w.row(r), row.data(), n_in);
                for (int64_t k = 0; k < n_in; ++k) dst[k * kGroup * kPanel] = row[k];
            }
        }
    }
    return panels;
}

// The rows of a quantized panel's block, gathered per row: integer values and scales.
struct BlockRows {
    uint8_t q[kPanel][256] = {};
    uint16_t d[kPanel] = {}, dmin[kPanel] = {};
    uint8_t sub_scale[16][kPanel] = {}, sub_min[8][kPanel] = {};
};

void read_block(DType type, const std::byte* block, int64_t lane, BlockRows& rows) {
    quant::block_values(type, block, rows.q[lane]);
    switch (type) {
        case DType::Q8_0: rows.d[lane] = reinterpret_cast<const quant::BlockQ8_0*>(block)->d; break;
        case DType::Q4_0: rows.d[lane] = reinterpret_cast<const quant::BlockQ4_0*>(block)->d; break;
        case DType::Q5_0: rows.d[lane] = reinterpret_cast<const quant::BlockQ5_0*>(block)->d; break;
        case DType::Q4_K: {
            auto b = reinterpret_cast<const quant::BlockQ4_K*>(block);
            rows.d[lane] = b->d;
            rows.dmin[lane] = b->dmin;
            for (int j = 0; j < 8; ++j) quant::q4_k_scale_min(b->scales, j, &rows.sub_scale[j][lane], &rows.sub_min[j][lane]);
            break;
        }
        default: {  // Q6_K
            auto b = reinterpret_cast<const quant::BlockQ6_K*>(block);
            rows.d[lane] = b->d;
            for (int g = 0; g < 16; ++g) rows.sub_scale[g][lane] = static_cast<uint8_t>(b->scales[g]);
        }
    }
}

// One chunk (panels.hpp) from the 16 rows' blocks.
void write_chunk(DType type, const BlockRows& rows, std::byte* chunk) {
    const panels::QuantLayout l = panels::layout(type);
    std::memcpy(chunk + l.d, rows.d, sizeof rows.d);
    if (l.dmin >= 0) std::memcpy(chunk + l.dmin, rows.dmin, sizeof rows.dmin);
    if (l.sub_scales >= 0) std::memcpy(chunk + l.sub_scales, rows.sub_scale, (type == DType::Q4_K ? 8 : 16) * kPanel);
    if (l.sub_mins >= 0) std::memcpy(chunk + l.sub_mins, rows.sub_min, sizeof rows.sub_min);
    auto value = [&](int64_t step, int64_t at) { return rows.q[at / 4][4 * step + at % 4]; };  // at = r * 4 + i
    auto values = reinterpret_cast<uint8_t*>(chunk + l.values);
    const int64_t steps = l.block / 4;
    for (int64_t at = 0; at < 64; ++at) {
        if (type == DType::Q8_0) {
            for (int64_t s = 0; s < steps; ++s) values[s * 64 + at] = value(s, at);
        } else {
            for (int64_t j = 0; j < steps / 2; ++j)
                values[j * 64 + at] = (value(2 * j, at) & 15) | (value(2 * j + 1, at) & 15) << 4;
        }
        if (type == DType::Q5_0) {
            uint8_t bits = 0;
            for (int64_t s = 0; s < 8; ++s) bits |= ((value(s, at) >> 4) & 1) << s;
            reinterpret_cast<uint8_t*>(chunk + l.high_bits)[at] = bits;
        } else if (type == DType::Q6_K) {
            for (int64_t t = 0; t < steps / 4; ++t) {
                uint8_t bits = 0;
                for (int64_t s = 0; s < 4; ++s) bits |= ((value(4 * t + s, at) >> 4) & 3) << (2 * s);
                reinterpret_cast<uint8_t*>(chunk + l.high_bits)[t * 64 + at] = bits;
            }
        }
    }
}

// Row r of w as blocks of `type`: a view when w holds that type, else quantized into `scratch`.
const std::byte* row_as(const Tensor& w, int64_t r, DType type, std::vector<float>& values,
                        std::vector<std::byte>& scratch) {
    if (w.dtype == type) return w.row(r);
    const int64_t n_in = w.size(1);
    values.resize(n_in);
    scratch.resize(bytes_of(type, n_in));
    quant::dequantize_row(w.dtype, w.row(r), values.data(), n_in);
    quant::quantize_row(type, values.data(), scratch.data(), n_in);
    return scratch.data();
}

Tensor pack_quantized(const Tensor& w, DType type) {
    LLAISYS_CHECK(w.dtype == type || type == DType::Q8_0 || type == DType::Q4_0,
                  std::string("pack_weight: cannot convert ") + dtype_name(w.dtype) + " to " + dtype_name(type));
    const int64_t n_out = w.size(0), n_in = w.size(1);
    const panels::QuantLayout l = panels::layout(type);
    LLAISYS_CHECK(n_in % l.block == 0, std::string("pack_weight: ") + dtype_name(type) + " needs rows of whole " +
                                           std::to_string(l.block) + "-value blocks");
    const int64_t n_blocks = n_in / l.block;
    // Chunks are whole 32-byte lines; the tensor is typed only to own the bytes.
    Tensor panels = zeros_on_huge_pages({n_groups(n_out) * kGroup * n_blocks * l.chunk / 4}, DType::I32);
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < n_panels(n_out); ++p) {
        std::vector<float> values;
        std::vector<std::vector<std::byte>> scratch(kPanel);
        const std::byte* row_blocks[kPanel] = {};
        for (int64_t lane = 0; lane < kPanel && p * kPanel + lane < n_out; ++lane)
            row_blocks[lane] = row_as(w, p * kPanel + lane, type, values, scratch[lane]);
        auto rows = std::make_unique<BlockRows>();
        for (int64_t b = 0; b < n_blocks; ++b) {
            *rows = BlockRows{};
            for (int64_t lane = 0; lane < kPanel; ++lane)
                if (row_blocks[lane] != nullptr) read_block(type, row_blocks[lane] + b * block_bytes(type), lane, *rows);
            const int64_t chunk_index = (p / kGroup) * n_blocks * kGroup + b * kGroup + p % kGroup;
            write_chunk(type, *rows, panels.base + chunk_index * l.chunk);
        }
    }
    return panels;
}

}  // namespace

size_t PackedWeight::nbytes() const {
    size_t total = 0;
    for (const PackedPart& part : parts) total += part.panels.nbytes();
    return total;
}

void append_rows(PackedWeight& fused, const Tensor& w, DType dtype) {
    LLAISYS_CHECK(w.ndim() == 2 && w.strides[1] == 1, "pack_weight: w must be a matrix with contiguous rows");
    LLAISYS_CHECK(fused.parts.empty() || fused.n_in == w.size(1), "pack_weight: fused parts differ in n_in");
    PackedPart part;
    part.dtype = dtype;
    part.row_begin = fused.n_out;
    part.n_out = w.size(0);
    if (dtype == DType::BF16 || dtype == DType::F32) part.panels = pack_float(w, dtype);
    else if (is_quantized(dtype)) part.panels = pack_quantized(w, dtype);
    else fail(__FILE__, __LINE__, std::string("pack_weight: cannot pack into ") + dtype_name(dtype));
    fused.n_in = w.size(1);
    fused.n_out += part.n_out;
    fused.parts.push_back(std::move(part));
}

PackedWeight pack_weight(const Tensor& w, DType dtype) {
    PackedWeight packed;
    append_rows(packed, w, dtype);
    return packed;
}

}  // namespace llaisys::ops
