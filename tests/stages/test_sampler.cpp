#include "diffpipe/stages/sampler.h"
#include "test_util.h"
