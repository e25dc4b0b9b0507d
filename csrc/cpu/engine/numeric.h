// Storage types and conversions to/from the accumulation type. Included by engine.h inside the per-ISA
// namespace. The half-precision conversions are branch-free so loops over them vectorise; they round to
// nearest even and keep NaN/Inf, matching torch's conversions.

struct BFloat16 {
  uint16_t bits;
};
struct Float16 {
  uint16_t bits;
};

inline float f32_from_bits(uint32_t bits) { return std::bit_cast<float>(bits); }
inline uint32_t f32_to_bits(float value) { return std::bit_cast<uint32_t>(value); }

inline float bf16_to_f32(uint16_t bits) { return f32_from_bits(static_cast<uint32_t>(bits) << 16); }

inline uint16_t f32_to_bf16(float value) {
  const uint32_t bits = f32_to_bits(value);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const bool is_nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(is_nan ? 0x7FC0u : rounded);
}

// IEEE binary16 <-> binary32 by exponent rebiasing through float arithmetic (the method of the FP16
// library that c10::Half also uses). Correct only without fp contraction (the build sets
// -ffp-contract=off).
inline float f16_to_f32(uint16_t half) {
  const uint32_t w = static_cast<uint32_t>(half) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude =
      two_w < (1u << 27) ? f32_to_bits(denormalized) : f32_to_bits(normalized);
  return f32_from_bits(sign | magnitude);
}

inline uint16_t f32_to_f16(float value) {
  float base = (std::fabs(value) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_to_bits(value);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

template <class Acc, class T>
inline Acc load(T value) {
  if constexpr (std::is_same_v<T, BFloat16>) {
    return static_cast<Acc>(bf16_to_f32(value.bits));
  } else if constexpr (std::is_same_v<T, Float16>) {
    return static_cast<Acc>(f16_to_f32(value.bits));
  } else {
    return static_cast<Acc>(value);
  }
}

template <class T, class Acc>
inline T store(Acc value) {
  if constexpr (std::is_same_v<T, BFloat16>) {
    return BFloat16{f32_to_bf16(static_cast<float>(value))};
  } else if constexpr (std::is_same_v<T, Float16>) {
    return Float16{f32_to_f16(static_cast<float>(value))};
  } else {
    return static_cast<T>(value);
  }
}

// fp64 arithmetic when either operand is stored in fp64, fp32 otherwise.
template <class A, class B>
using AccumulateT =
    std::conditional_t<std::is_same_v<A, double> || std::is_same_v<B, double>, double, float>;

template <class T>
inline void fill_zero(T* data, int64_t count) {
  const T zero = store<T>(0.0f);
  for (int64_t i = 0; i < count; ++i) data[i] = zero;
}
