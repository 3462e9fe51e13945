// `lazycr show` of an incremental image's chain (image-format/image_chain.h): each link from
// this image back to the full dump, and what each stores itself and leaves to its parent.
#pragma once

#include <ostream>

#include "common/json.h"
#include "image-format/image_dir.h"

namespace lazycr::cli {

// "Chain: ..." lines, newest link first; nothing for a full image.
void print_chain_text(std::ostream& o, const image::ImageReader& img);
// Field "chain" of the image object: one object per link, newest first (this image alone for
// a full image).
void chain_json(JsonWriter& j, const image::ImageReader& img);
// show --verify: decompresses every frame of every parent link (the image's own frames are
// verified by the caller).
void verify_parents(const image::ImageReader& img);

}  // namespace lazycr::cli
