#include "image-format/sha256_pair.h"

#include <openssl/evp.h>

#include <memory>

// Without it, the header defines compatibility macros (SHA1, SHA256, ...) that collide with
// OpenSSL's functions of the same names.
#define NO_COMPAT_IMB_API_053
#include <intel-ipsec-mb.h>

#include "common/error.h"

namespace lazycr::image {
namespace {

struct MgrFree {
  void operator()(IMB_MGR* m) const { free_mb_mgr(m); }
};

// This thread's job manager, made on first use (the compressing threads and the drain's
// workers hash concurrently; a manager is not thread-safe); null where it would be slower than
// libcrypto. In 1.3 only the SSE manager hashes SHA-256 on the SHA extensions (two lanes,
// ~2x one message's speed); the AVX2 one init_mb_mgr_auto picks on this CPU runs 8 lanes of
// AVX2 code, 1/4 of libcrypto's speed with two messages (bench/RESULTS.md). Without the SHA
// extensions libcrypto hashes.
IMB_MGR* thread_mgr() {
  thread_local std::unique_ptr<IMB_MGR, MgrFree> mgr;
  thread_local bool tried = false;
  if (!tried) {
    tried = true;
    std::unique_ptr<IMB_MGR, MgrFree> m(alloc_mb_mgr(0));
    if (m && (m->features & IMB_FEATURE_SHANI) != 0) {
      init_mb_mgr_sse(m.get());
      if (imb_get_errno(m.get()) == 0) mgr = std::move(m);
    }
  }
  return mgr.get();
}

// One message of a pair: where its digest goes, and whether the job manager computed it.
struct Message {
  const void* data;
  size_t len;
  unsigned char* out;
  bool done = false;
};

// Hashes both messages as two jobs of one manager (its SHA-256 lanes run them together), and
// marks those it computed. A job it refuses (1.3's job check takes at most 65,534 bytes per
// hash job, MB_MAX_LEN16) is left undone for libcrypto.
void mgr_pair(IMB_MGR* mgr, Message* msg) {
  for (int i = 0; i < 2; ++i) {
    IMB_JOB* job = IMB_GET_NEXT_JOB(mgr);
    job->src = static_cast<const uint8_t*>(msg[i].data);
    job->hash_start_src_offset_in_bytes = 0;
    job->msg_len_to_hash_in_bytes = msg[i].len;
    job->auth_tag_output = msg[i].out;
    job->auth_tag_output_len_in_bytes = kSha256Bytes;
    job->hash_alg = IMB_AUTH_SHA_256;
    job->cipher_mode = IMB_CIPHER_NULL;
    job->cipher_direction = IMB_DIR_ENCRYPT;
    job->chain_order = IMB_ORDER_HASH_CIPHER;
    job->user_data = &msg[i];
    for (job = IMB_SUBMIT_JOB(mgr); job != nullptr; job = IMB_GET_COMPLETED_JOB(mgr))
      static_cast<Message*>(job->user_data)->done = job->status == IMB_STATUS_COMPLETED;
  }
  // Both submitted: the manager is emptied, so the next call starts from nothing.
  for (IMB_JOB* job = IMB_FLUSH_JOB(mgr); job != nullptr; job = IMB_FLUSH_JOB(mgr))
    static_cast<Message*>(job->user_data)->done = job->status == IMB_STATUS_COMPLETED;
}

}  // namespace

bool sha256_pair_multibuffer() {
  return thread_mgr() != nullptr;
}

void sha256_one(const void* data, size_t len, unsigned char* out) {
  unsigned int n = 0;
  if (EVP_Digest(data, len, out, &n, EVP_sha256(), nullptr) != 1 || n != kSha256Bytes)
    fail("libcrypto cannot compute a SHA-256");
}

void sha256_pair(const void* a, size_t alen, const void* b, size_t blen, unsigned char* out_a,
                 unsigned char* out_b) {
  Message msg[2] = {{a, alen, out_a}, {b, blen, out_b}};
  if (IMB_MGR* mgr = thread_mgr()) mgr_pair(mgr, msg);
  for (const Message& m : msg)
    if (!m.done) sha256_one(m.data, m.len, m.out);
}

}  // namespace lazycr::image
