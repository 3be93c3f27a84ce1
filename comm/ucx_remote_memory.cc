#include "comm/ucx_remote_memory.h"

#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>

#include "comm/comm_check.h"
#include "runtime/core/logging.h"
#include "runtime/core/params.h"

EF_PARAM(DebugUcxWireupPauseS, double, "EF_DEBUG_UCX_WIREUP_PAUSE_S", 0.0,
         "testing: every rank sleeps this many seconds after the ucx address exchange (over MPI) and before it "
         "creates its ucx endpoints (0: no pause)");

namespace ef::comm {
namespace {

std::string Seconds(double s) {
  char t[32];
  std::snprintf(t, sizeof(t), "%g", s);
  return t;
}

// The UCX settings that decide which peers a worker can reach, for errors about unreachable peers.
std::string UcxReachSettings(const std::string& tls) {
  using params::detail::GetEnv;
  const char* devices = GetEnv("UCX_NET_DEVICES");
  return "UCX_TLS=" + (tls == "auto" && GetEnv("UCX_TLS") ? std::string(GetEnv("UCX_TLS")) : tls) +
         ", UCX_NET_DEVICES=" + (devices ? devices : "all");
}

// Serialised per-rank record: [u64 addr_len][addr][u64 rkey_len][rkey][u64 base][u64 bytes].
void PutU64(std::vector<char>* b, uint64_t v) {
  const char* p = reinterpret_cast<const char*>(&v);
  b->insert(b->end(), p, p + sizeof(v));
}
bool GetU64(const std::vector<char>& b, size_t* pos, uint64_t* v) {
  if (*pos + sizeof(*v) > b.size()) return false;
  std::memcpy(v, b.data() + *pos, sizeof(*v));
  *pos += sizeof(*v);
  return true;
}

}  // namespace

StatusOr<std::unique_ptr<UcxRemoteMemory>> UcxRemoteMemory::Create(MpiContext* ctx, void* region, size_t bytes,
                                                                   const UcxOptions& options) {
  auto m = std::unique_ptr<UcxRemoteMemory>(new UcxRemoteMemory());
  m->ctx_ = ctx;
  const int n = ctx->size(), me = ctx->rank();

  ucp_config_t* config = nullptr;
  UCS_CHECK(ucp_config_read(nullptr, nullptr, &config));
  if (options.force_tcp) {
    // As between nodes: no shared memory or CMA between ranks of one host.
    const ucs_status_t st = ucp_config_modify(config, "TLS", "tcp,self");
    if (st != UCS_OK) {
      ucp_config_release(config);
      UCS_CHECK(st);
    }
    m->tls_ = "tcp,self";
  }
  // UCX's TCP transport connects with a blocking connect() inside ucp_ep_create unless told not
  // to (UCX_TCP_CONN_NB=n, its default): a peer behind a dead link would hold this rank there for
  // the kernel's SYN retries (minutes), past every deadline. Non-blocking, an unreachable peer
  // shows up as a get that fails or misses the timeout, naming the rank. Every listener is up
  // before the addresses are exchanged, so the "connection refused" that UCX warns of for
  // non-blocking connects to a slow listener cannot happen here. An explicit UCX_TCP_CONN_NB wins.
  if (!params::detail::GetEnv("UCX_TCP_CONN_NB")) {
    const ucs_status_t st = ucp_config_modify(config, "CONN_NB", "y");
    if (st != UCS_OK) {
      ucp_config_release(config);
      UCS_CHECK(st);
    }
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_RMA;
  const ucs_status_t init = ucp_init(&params, config, &m->context_);
  ucp_config_release(config);
  UCS_CHECK(init);

  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SINGLE;
  UCS_CHECK(ucp_worker_create(m->context_, &wp, &m->worker_));

  if (region == nullptr || bytes == 0) {
    region = m->dummy_;
    bytes = sizeof(m->dummy_);
  }
  ucp_mem_map_params_t mp{};
  mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
  mp.address = region;
  mp.length = bytes;
  UCS_CHECK(ucp_mem_map(m->context_, &mp, &m->memh_));

  std::vector<char> mine;
  {
    ucp_address_t* addr = nullptr;
    size_t addr_len = 0;
    UCS_CHECK(ucp_worker_get_address(m->worker_, &addr, &addr_len));
    PutU64(&mine, addr_len);
    mine.insert(mine.end(), reinterpret_cast<char*>(addr), reinterpret_cast<char*>(addr) + addr_len);
    ucp_worker_release_address(m->worker_, addr);
    void* rkey_buf = nullptr;
    size_t rkey_len = 0;
    UCS_CHECK(ucp_rkey_pack(m->context_, m->memh_, &rkey_buf, &rkey_len));
    PutU64(&mine, rkey_len);
    mine.insert(mine.end(), static_cast<char*>(rkey_buf), static_cast<char*>(rkey_buf) + rkey_len);
    ucp_rkey_buffer_release(rkey_buf);
    PutU64(&mine, reinterpret_cast<uint64_t>(region));
    PutU64(&mine, bytes);
  }
  // Peers' wireup needs this worker progressed while we wait on MPI.
  UcxRemoteMemory* self = m.get();
  ctx->set_progress_hook([self] { self->Progress(); });
  EF_ASSIGN_OR_RETURN(auto all, ctx->AllGatherBytes(mine, "the ucx address and rkey exchange"));
  if (const double pause = params::DebugUcxWireupPauseS(); pause > 0) {
    std::fprintf(stderr, "rank %d: EF_DEBUG_UCX_WIREUP_PAUSE_S=%g, pausing before ucx wire-up\n", me, pause);
    std::fflush(stderr);
    std::this_thread::sleep_for(std::chrono::duration<double>(pause));
  }

  m->eps_.assign(n, nullptr);
  m->rkeys_.assign(n, nullptr);
  m->bases_.assign(n, 0);
  m->sizes_.assign(n, 0);
  m->transport_.assign(n, "");
  for (int r = 0; r < n; ++r) {
    const std::vector<char>& b = all[r];
    size_t pos = 0;
    uint64_t addr_len = 0, rkey_len = 0;
    if (!GetU64(b, &pos, &addr_len) || pos + addr_len > b.size())
      return Internal("bad ucx address record from rank " + std::to_string(r));
    const char* addr = b.data() + pos;
    pos += addr_len;
    if (!GetU64(b, &pos, &rkey_len) || pos + rkey_len > b.size())
      return Internal("bad ucx rkey record from rank " + std::to_string(r));
    const char* rkey = b.data() + pos;
    pos += rkey_len;
    if (!GetU64(b, &pos, &m->bases_[r]) || !GetU64(b, &pos, &m->sizes_[r]))
      return Internal("bad ucx region record from rank " + std::to_string(r));
    if (r == me) continue;
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS;
    ep.address = reinterpret_cast<const ucp_address_t*>(addr);
    if (const ucs_status_t st = ucp_ep_create(m->worker_, &ep, &m->eps_[r]); st != UCS_OK) {
      m->eps_[r] = nullptr;
      return Unavailable(ctx->DescribeRank(me) + " cannot reach " + ctx->DescribeRank(r) +
                         " over ucx: ucp_ep_create: " + ucs_status_string(st) + " (" + UcxReachSettings(m->tls_) +
                         "); the transports and devices must reach every peer's node (`ucx_info -d` lists them)");
    }
    UCS_CHECK(ucp_ep_rkey_unpack(m->eps_[r], rkey, &m->rkeys_[r]));
  }
  EF_LOG(INFO, COMM, "ucx remote memory: %zu bytes registered, tls %s, %d peers", bytes, m->tls_.c_str(), n - 1);
  return m;
}

void UcxRemoteMemory::Progress() {
  if (worker_) ucp_worker_progress(worker_);
}

std::string UcxRemoteMemory::DescribeEndpoint(int rank) {
  char* text = nullptr;
  size_t len = 0;
  FILE* f = open_memstream(&text, &len);
  if (!f) return "";
  ucp_ep_print_info(eps_[rank], f);
  std::fclose(f);
  // Lines look like "#  lane[0]:  3:tcp/lo.0 md[1] ...": collect the transport/device names.
  std::string out, s(text, len);
  std::free(text);
  size_t p = 0;
  while ((p = s.find("lane[", p)) != std::string::npos) {
    size_t colon = s.find(':', s.find(']', p));
    size_t q = colon + 1;
    while (q < s.size() && s[q] == ' ') ++q;
    while (q < s.size() && std::isdigit(static_cast<unsigned char>(s[q]))) ++q;
    if (q < s.size() && s[q] == ':') ++q;
    size_t e = q;
    while (e < s.size() && !std::isspace(static_cast<unsigned char>(s[e]))) ++e;
    std::string tl = s.substr(q, e - q);
    if (!tl.empty() && out.find(tl) == std::string::npos) out += (out.empty() ? "" : ",") + tl;
    p = e;
  }
  return out;
}

Status UcxRemoteMemory::Get(int rank, uint64_t offset, void* dst, size_t bytes) {
  if (rank < 0 || rank >= static_cast<int>(eps_.size()) || !eps_[rank])
    return InvalidArgument("no ucx endpoint to rank " + std::to_string(rank));
  if (offset + bytes > sizes_[rank])
    return OutOfRange("get of " + std::to_string(bytes) + " bytes at " + std::to_string(offset) + " is past rank " +
                      std::to_string(rank) + "'s region of " + std::to_string(sizes_[rank]) + " bytes");
  const auto t0 = std::chrono::steady_clock::now();
  ucp_request_param_t param{};
  ucs_status_ptr_t req = ucp_get_nbx(eps_[rank], dst, bytes, bases_[rank] + offset, rkeys_[rank], &param);
  if (UCS_PTR_IS_ERR(req)) UCS_CHECK(UCS_PTR_STATUS(req));
  if (req != nullptr) {
    // Completion of a get means the bytes are here; flush is not needed.
    using Clock = std::chrono::steady_clock;
    const auto deadline = Clock::now() + std::chrono::duration<double>(ctx_->timeout_s());
    ucs_status_t st;
    int spins = 0;
    while ((st = ucp_request_check_status(req)) == UCS_INPROGRESS) {
      if (ucp_worker_progress(worker_) == 0 && ++spins > 1024)
        std::this_thread::sleep_for(std::chrono::microseconds(20));
      if (Clock::now() > deadline) {
        // A cancel may itself never complete (a get over TCP to a stalled peer): wait for it a
        // bounded time, then hand the request back to UCX (freeing an unfinished request is allowed;
        // the caller treats dst as lost and the rank ends with this error).
        ucp_request_cancel(worker_, req);
        const auto cancel_deadline = Clock::now() + std::chrono::seconds(2);
        while (ucp_request_check_status(req) == UCS_INPROGRESS && Clock::now() < cancel_deadline)
          ucp_worker_progress(worker_);
        ucp_request_free(req);
        return DeadlineExceeded(ctx_->DescribeRank(rank) + " did not complete a ucx get of " + std::to_string(bytes) +
                                " bytes within " + Seconds(ctx_->timeout_s()) + " s (seen from " +
                                ctx_->DescribeRank(ctx_->rank()) + ")");
      }
    }
    ucp_request_free(req);
    if (st != UCS_OK)
      return Unavailable("ucx get from " + ctx_->DescribeRank(rank) + " failed: " + ucs_status_string(st) +
                         " (seen from " + ctx_->DescribeRank(ctx_->rank()) + "; " + UcxReachSettings(tls_) + ")");
  }
  if (transport_[rank].empty()) transport_[rank] = DescribeEndpoint(rank);
  bytes_fetched_ += static_cast<int64_t>(bytes);
  ++num_gets_;
  get_ns_ += (std::chrono::steady_clock::now() - t0) / std::chrono::nanoseconds(1);
  return Status::Ok();
}

Status UcxRemoteMemory::Shutdown() {
  Status st = ctx_->Barrier("the ucx shutdown barrier");
  Release();
  return st;
}

void UcxRemoteMemory::Release() {
  if (ctx_) ctx_->set_progress_hook(nullptr);
  for (ucp_rkey_h& k : rkeys_) {
    if (k) ucp_rkey_destroy(k);
    k = nullptr;
  }
  for (ucp_ep_h& ep : eps_) {
    if (!ep) continue;
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = UCP_EP_CLOSE_FLAG_FORCE;
    ucs_status_ptr_t req = ucp_ep_close_nbx(ep, &p);
    if (UCS_PTR_IS_PTR(req)) {
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
      while (ucp_request_check_status(req) == UCS_INPROGRESS && std::chrono::steady_clock::now() < deadline)
        ucp_worker_progress(worker_);
      ucp_request_free(req);
    }
    ep = nullptr;
  }
  if (memh_) ucp_mem_unmap(context_, memh_);
  memh_ = nullptr;
  if (worker_) ucp_worker_destroy(worker_);
  worker_ = nullptr;
  if (context_) ucp_cleanup(context_);
  context_ = nullptr;
}

UcxRemoteMemory::~UcxRemoteMemory() { Release(); }

}  // namespace ef::comm
