#include "diffpipe/stages/tokenizer.h"
#include "test_util.h"
