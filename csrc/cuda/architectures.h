// Which of a build's CUDA images can run on a device, read from CMake's CUDA_ARCHITECTURES list
// alone (host C++, no CUDA): asking the runtime instead (cudaFuncGetAttributes) needs the device
// made current, which creates its context, half a gigabyte on every GPU of the machine from every
// process that only wanted to know whether a GPU is there.
#pragma once

#include <cctype>
#include <string>

namespace fusedopt {
namespace cuda {

enum class ImagesFor {
  none,          // no image runs on the device
  machine_code,  // a real image (SASS) for its major version, at its minor or earlier
  ptx,           // only PTX, which the driver compiles if its own version is recent enough
  unknown,       // a list not read here ("native", "all", an arch-specific suffix)
};

// `list`: "80-real,90-real,90-virtual" (CMake's ';' made ','), an entry without a suffix being
// both real and virtual. A real image runs on devices of its major version at its minor or
// later; a virtual one (PTX) is compiled by the driver for any later device.
inline ImagesFor images_for(const std::string& list, int major, int minor) {
  bool machine_code = false, ptx = false;
  for (size_t begin = 0; begin <= list.size();) {
    size_t end = list.find(',', begin);
    if (end == std::string::npos) end = list.size();
    const std::string entry = list.substr(begin, end - begin);
    begin = end + 1;
    size_t digits = 0;
    while (digits < entry.size() && std::isdigit(static_cast<unsigned char>(entry[digits])))
      ++digits;
    const std::string kind = entry.substr(digits);
    if (digits < 2 || digits > 3 || (!kind.empty() && kind != "-real" && kind != "-virtual"))
      return ImagesFor::unknown;
    const int arch = std::stoi(entry.substr(0, digits));
    if (kind != "-virtual" && major == arch / 10 && minor >= arch % 10) machine_code = true;
    if (kind != "-real" && major * 10 + minor >= arch) ptx = true;
  }
  if (machine_code) return ImagesFor::machine_code;
  return ptx ? ImagesFor::ptx : ImagesFor::none;
}

}  // namespace cuda
}  // namespace fusedopt
