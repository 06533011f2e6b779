// The recipes of diffpipe's own shapes model, one module at a time, into a diffusers-layout folder
// (models/shapes-sd/MODEL_CARD.md): the VAE, the CLIP-style text encoder with its image tower, the UNet (needs
// the VAE and the text encoder), and the 2x super-resolution stage.
#pragma once
#include "diffpipe/train/trainer.h"

namespace diffpipe::train {

void train_vae(const TrainOptions& o);
void train_text(const TrainOptions& o);
void train_unet(const TrainOptions& o);
void train_sr(const TrainOptions& o);

}  // namespace diffpipe::train
