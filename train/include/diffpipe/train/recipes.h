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
// The DALL-E-2-style variant (models/shapes-unclip, diffusers' Stable unCLIP layout), from a trained shapes model
// `from` (its tokenizer, text encoder, image tower, VAE, UNet): train_prior writes the folder (copied parts,
// DDPM schedulers, the image normaliser) and trains the diffusion prior (text -> image-tower embedding);
// train_decoder then grows `from`'s UNet by a class embedding of the noise-augmented image embedding and
// fine-tunes it.
void train_prior(const TrainOptions& o, const std::string& from);
void train_decoder(const TrainOptions& o, const std::string& from);

}  // namespace diffpipe::train
