// graphpress artifact loader: runs a compiled TVM Relax library with only the TVM runtime.
//
// Built at test time for aarch64 (aarch64-linux-gnu-g++) against the arm64 libtvm_runtime.so and
// libtvm_ffi.so from the PyPI aarch64 wheels, and executed under qemu-aarch64, so that an aarch64
// artifact is checked by running it rather than only by linking it. It uses the same entry points
// as the Python runtime (vm_load_executable, vm_initialization, main).
//
// usage: loader LIB.so OUT_PREFIX INPUT...
//   INPUT      = FILE:DTYPE:D0,D1,...   raw little-endian C-order bytes, e.g. x.bin:float32:1,32,32,3
//   outputs    : OUT_PREFIX0.bin, OUT_PREFIX1.bin, ... and one line "OUTPUT i DTYPE D0,D1,..." each
// Exit status 0 on success; 1 with a message on stderr otherwise.
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

struct CPUAlloc {
  void AllocData(DLTensor* t) { t->data = std::malloc(ffi::GetDataSize(*t)); }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

std::vector<std::string> Split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep)) parts.push_back(item);
  return parts;
}

ffi::Tensor ReadInput(const std::string& spec) {
  std::vector<std::string> f = Split(spec, ':');
  if (f.size() != 3) throw std::runtime_error("bad input spec '" + spec + "' (want FILE:DTYPE:SHAPE)");
  std::vector<int64_t> shape;
  for (const std::string& d : Split(f[2], ',')) shape.push_back(std::stoll(d));
  DLDataType dtype = ffi::StringToDLDataType(f[1]);
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::ShapeView(shape.data(), shape.size()),
                                           dtype, DLDevice{kDLCPU, 0});
  size_t nbytes = ffi::GetDataSize(*t.GetDLTensorPtr());
  std::ifstream in(f[0], std::ios::binary);
  in.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(nbytes));
  if (static_cast<size_t>(in.gcount()) != nbytes || in.peek() != EOF) {
    throw std::runtime_error(f[0] + ": expected exactly " + std::to_string(nbytes) + " bytes");
  }
  return t;
}

void WriteOutput(const ffi::Tensor& t, const std::string& prefix, size_t index) {
  std::string path = prefix + std::to_string(index) + ".bin";
  std::ofstream out(path, std::ios::binary);
  out.write(static_cast<const char*>(t.data_ptr()),
            static_cast<std::streamsize>(ffi::GetDataSize(*t.GetDLTensorPtr())));
  if (!out) throw std::runtime_error("cannot write " + path);
  std::cout << "OUTPUT " << index << " " << ffi::DLDataTypeToString(t.dtype()) << " ";
  for (int i = 0; i < t.ndim(); ++i) std::cout << (i ? "," : "") << t.shape()[i];
  std::cout << "\n";
}

ffi::Function Get(const ffi::Module& m, const char* name) {
  ffi::Optional<ffi::Function> f = m->GetFunction(name);
  if (!f.has_value()) throw std::runtime_error(std::string("library has no function ") + name);
  return f.value();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0] << " LIB.so OUT_PREFIX FILE:DTYPE:SHAPE...\n";
    return 1;
  }
  try {
    ffi::Module lib = ffi::Module::LoadFromFile(argv[1]);
    ffi::Module vm = Get(lib, "vm_load_executable")().cast<ffi::Module>();
    constexpr int kPooledAllocator = 2;
    Get(vm, "vm_initialization")(static_cast<int>(kDLCPU), 0, kPooledAllocator);
    std::vector<ffi::Any> args;
    for (int i = 3; i < argc; ++i) args.push_back(ReadInput(argv[i]));
    ffi::Any result;
    Get(vm, "main").CallPacked(ffi::PackedArgs(reinterpret_cast<const ffi::AnyView*>(args.data()),
                                               static_cast<int>(args.size())),
                               &result);
    if (auto tensor = result.as<ffi::Tensor>()) {
      WriteOutput(tensor.value(), argv[2], 0);
    } else {
      ffi::Array<ffi::Any> outputs = result.cast<ffi::Array<ffi::Any>>();
      for (size_t i = 0; i < outputs.size(); ++i) WriteOutput(outputs[i].cast<ffi::Tensor>(), argv[2], i);
    }
  } catch (const std::exception& e) {
    std::cerr << "loader: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
