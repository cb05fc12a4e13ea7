// Every algorithm fusedopt has, by its description (csrc/math/algorithm.h). Each layer (the
// validator and work list, the per-ISA CPU kernels, the CUDA kernels, the C ABI and both Python
// modules) is generic over this list: adding an algorithm is its header and one entry here.
#pragma once

#include "math/adadelta.h"
#include "math/adagrad.h"
#include "math/adam.h"
#include "math/adamax.h"
#include "math/asgd.h"
#include "math/lamb.h"
#include "math/lion.h"
#include "math/nadam.h"
#include "math/radam.h"
#include "math/rmsprop.h"
#include "math/rprop.h"
#include "math/sgd.h"

namespace fusedopt {

using Algorithms = AlgorithmList<Sgd, Adagrad, Rmsprop, Adam, Adadelta, Adamax, Nadam, Radam, Rprop,
                                 Asgd, Lion, Lamb>;

}  // namespace fusedopt
