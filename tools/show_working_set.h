// `lazycr show` of the image's working-set record (uffd/working_set.h, FORMAT.md
// "working-set.lzw"): what it holds, and whether a lazy restore would use it.
#pragma once

#include <ostream>

#include "common/json.h"
#include "image-format/image_dir.h"

namespace lazycr::cli {

// "Working set: ..." lines; nothing when the image has no record.
void print_working_set_text(std::ostream& o, const image::ImageReader& img);
// Field "working_set" of the image object: null when the image has no record.
void working_set_json(JsonWriter& j, const image::ImageReader& img);

}  // namespace lazycr::cli
