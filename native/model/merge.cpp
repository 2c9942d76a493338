// merge_and_unload over the base model's original shards (see merge.h): one tensor in memory at a
// time, W' = W + s·B·A accumulated in float32 straight into the tensor (no separate delta), every
// floating tensor written in the requested dtype, everything else copied byte for byte.
//
// All-or-nothing on disk: every shard is first written (atomically, by write_safetensors) as
// "<name>.partial" in the output folder; only when all of them are complete are they renamed to their
// final names. A failure or a cancel removes the partial files, so the folder never holds a subset.
#include "model/merge.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <memory>
#include <set>

#include "core/durable_fs.h"
#include "core/error.h"
#include "core/nf4.h"
#include "core/safetensors.h"

namespace ts {

namespace {

bool is_floating(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16 || t == DType::F64; }

std::string base_name(const std::string& path) {
  size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); i++) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// "model.layers.<N>.self_attn.<q|k|v|o>_proj.weight" / "model.layers.<N>.mlp.<gate|up|down>_proj.weight":
// the block linear weights, the only tensors an adapter touches and the engine quantizes.
bool parse_block_linear(const std::string& name, int* layer, int* target) {
  static const std::string prefix = "model.layers.";
  if (name.compare(0, prefix.size(), prefix) != 0) return false;
  size_t pos = prefix.size();
  int64_t n = 0;
  size_t digits = 0;
  while (pos < name.size() && name[pos] >= '0' && name[pos] <= '9' && digits < 9) {
    n = n * 10 + (name[pos] - '0');
    pos++;
    digits++;
  }
  if (digits == 0 || (digits > 1 && name[prefix.size()] == '0')) return false;
  const std::string rest = name.substr(pos);
  for (int t = 0; t < NUM_TARGETS; t++) {
    const std::string want = std::string(t <= O ? ".self_attn." : ".mlp.") + target_name(t) + ".weight";
    if (rest == want) {
      *layer = int(n);
      *target = t;
      return true;
    }
  }
  return false;
}

struct Plan {
  int layer = -1, target = -1;   // block linear weight, else -1
  const LoraModule* module = nullptr;  // adapter module merged into this tensor, if any
  bool dequantize = false;       // replace W by dequant(NF4(W)) first
};

bool same_file(const std::string& a, const std::string& b) {
  struct stat sa, sb;
  return ::stat(a.c_str(), &sa) == 0 && ::stat(b.c_str(), &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}



}  // namespace

MergeResult merge_adapter(const MergeSpec& spec, const std::function<void(const MergeProgress&)>& progress,
                          const std::function<bool()>& cancelled) {
  auto check_cancel = [&] {
    if (cancelled && cancelled()) throw EngineError("CANCELLED", "merge cancelled");
  };
  require(!spec.shards.empty(), "INVALID_ARGUMENT", "merge: no base model shards given");
  require(spec.dtype == DType::F32 || spec.dtype == DType::F16 || spec.dtype == DType::BF16, "INVALID_ARGUMENT",
          std::string("merge: output dtype must be F32, F16 or BF16, got ") + dtype_name(spec.dtype));
  struct stat st;
  require(::stat(spec.out_dir.c_str(), &st) == 0 && S_ISDIR(st.st_mode), "NOT_FOUND",
          "merge: output folder " + spec.out_dir + " does not exist");
  require(spec.host != nullptr && spec.host->device() == DeviceKind::CPU, "INTERNAL",
          "merge: needs a host-memory backend for its products");
  const LoraAdapter* adapter = spec.adapter;
  check_cancel();

  // Open every shard (headers only) and plan every tensor before writing anything, so a bad file or
  // an adapter that does not fit the base fails with nothing written.
  std::vector<std::unique_ptr<SafetensorsReader>> readers;
  std::vector<std::vector<Plan>> plans;  // (shards, tensors of the shard)
  std::set<std::string> names, files;
  std::map<std::pair<int, int>, bool> merged_modules;  // (layer, target) -> seen in the base
  int64_t total = 0;
  for (const std::string& shard : spec.shards) {
    readers.push_back(std::make_unique<SafetensorsReader>(shard));
    const std::string file = base_name(shard);
    require(files.insert(file).second, "INVALID_ARGUMENT", "merge: two base shards are both named " + file);
    require(!same_file(parent_dir(shard), spec.out_dir), "INVALID_ARGUMENT",
            "merge: the output folder " + spec.out_dir + " holds the base model itself; merge into a new folder");
    std::vector<Plan> plan;
    for (const TensorInfo& t : readers.back()->tensors()) {
      require(names.insert(t.name).second, "INVALID_SAFETENSORS",
              shard + ": tensor " + t.name + " also appears in another shard");
      Plan p;
      if (is_floating(t.dtype) && parse_block_linear(t.name, &p.layer, &p.target)) {
        const bool matrix = t.shape.size() == 2;
        // As the engine's loader: NF4 only where a row splits into whole 64-weight blocks.
        p.dequantize = spec.into_dequantized && matrix && t.shape[1] > 0 && t.shape[1] % NF4_BLOCK == 0;
        if (adapter && p.layer < adapter->L && adapter->has(p.target)) {
          const LoraModule& m = adapter->mod(p.layer, p.target);
          require(matrix && t.shape[0] == m.out && t.shape[1] == m.in, "ADAPTER_MISMATCH",
                  shard + ": tensor " + t.name + " has shape " + shape_string(t.shape) + " but the adapter's " +
                      target_name(p.target) + " of layer " + std::to_string(p.layer) + " needs [" +
                      std::to_string(m.out) + ", " + std::to_string(m.in) + "]");
          p.module = &m;
          merged_modules[{p.layer, p.target}] = true;
        }
      }
      plan.push_back(p);
    }
    total += int64_t(plan.size());
    plans.push_back(std::move(plan));
  }
  if (adapter) {
    for (int l = 0; l < adapter->L; l++)
      for (int t = 0; t < NUM_TARGETS; t++)
        require(!adapter->has(t) || merged_modules.count({l, t}), "ADAPTER_MISMATCH",
                "merge: the base model has no tensor model.layers." + std::to_string(l) +
                    (t <= O ? ".self_attn." : ".mlp.") + target_name(t) + ".weight for the adapter's module");
  }

  MergeResult result;
  std::vector<std::string> partials;  // files written so far; removed unless everything completes
  try {
    std::vector<float> work;  // the one float32 tensor in memory
    int64_t index = 0;
    for (size_t s = 0; s < readers.size(); s++) {
      check_cancel();
      const SafetensorsReader& reader = *readers[s];
      const std::vector<TensorInfo>& infos = reader.tensors();
      const std::string file = base_name(spec.shards[s]);
      std::vector<TensorDecl> decls;
      decls.reserve(infos.size());
      for (const TensorInfo& t : infos) decls.push_back({t.name, is_floating(t.dtype) ? spec.dtype : t.dtype, t.shape});

      const std::string partial = spec.out_dir + "/" + file + ".partial";
      partials.push_back(partial);
      write_safetensors(partial, decls, {{"format", "pt"}}, [&](size_t i, std::vector<uint8_t>& bytes) {
        check_cancel();
        const TensorInfo& t = infos[i];
        const Plan& p = plans[s][i];
        const size_t n = size_t(t.numel());
        if (!is_floating(t.dtype) || (t.dtype == spec.dtype && !p.module && !p.dequantize)) {
          // Integer tensors, and floats already in the output dtype that nothing changes: bit-exact copy.
          bytes.resize(t.end - t.begin);
          reader.read_raw(t, bytes.data());
        } else {
          work.resize(n);
          reader.read_f32(t, work.data());
          if (p.dequantize) {
            const int64_t rows = t.shape[0], cols = t.shape[1];
            NF4Matrix q = nf4_quantize(work.data(), rows, cols);
            nf4_dequantize_rows(q.view(), 0, rows, work.data());
          }
          if (p.module) {
            // W[out,in] += s · B[out,r] · A[r,in]
            const LoraModule& m = *p.module;
            auto host = [](const float* data, int64_t rows, int64_t cols) {
              return make_tensor(const_cast<float*>(data), DType::F32, rows, cols, DeviceKind::CPU);
            };
            spec.host->matmul(host(work.data(), m.out, m.in), false, host(m.B.data(), m.out, m.r), false,
                              host(m.A.data(), m.r, m.in), adapter->scaling, 1.f);
          }
          bytes.resize(n * dtype_size(spec.dtype));
          convert_from_f32(bytes.data(), work.data(), spec.dtype, n);
        }
        result.tensors++;
        if (p.module) result.merged_tensors++;
        result.weight_map.emplace_back(t.name, file);
        if (progress) progress(MergeProgress{t.name, ++index, total, p.module != nullptr});
      });
    }
    // Last point of no return: a cancel that arrived during the final shard still wins.
    check_cancel();
    for (size_t s = 0; s < readers.size(); s++) {
      const std::string file = base_name(spec.shards[s]);
      const std::string final_path = spec.out_dir + "/" + file;
      if (::rename(partials[s].c_str(), final_path.c_str()) != 0)
        throw EngineError("IO_ERROR", final_path + ": rename from " + partials[s] + " failed: " + std::strerror(errno));
      partials[s] = final_path;  // still removed if a later rename fails: never a subset of the shards
      struct stat fs;
      if (::stat(final_path.c_str(), &fs) == 0) result.bytes += int64_t(fs.st_size);
      result.files.push_back(file);
    }
    fsync_dir(spec.out_dir);
  } catch (...) {
    for (const std::string& path : partials) ::unlink(path.c_str());
    throw;
  }
  return result;
}

}  // namespace ts
