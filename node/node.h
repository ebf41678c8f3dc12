/* tandem: the runtime of a prefill or a decode node (tandem-prefill,
 * tandem-decode). DESIGN.md "A request's walk", steps 3 to 5.
 *
 * Two threads. The network thread (main) drives the UCX worker (router
 * connections and the KV store client share one transport), heartbeats
 * and every job's state; the engine thread steps the engine (compute
 * inside a step runs on the engine's thread pool). A step of any length
 * therefore never delays a heartbeat: a busy node is never taken for a
 * lost one. Jobs go to the engine through tdm_engine_add / cancel; its
 * events come back through a locked queue that wakes the network thread
 * (tdm_net_signal). --max-step-ms bounds a step's wall time by sizing
 * prompt chunks from measured step times, so decode streams keep flowing
 * while a long prompt is computed.
 *
 *   prefill: for a JOB_PREFILL, LOOKUP the prompt's full-block keys in the
 *            store, GET the leading blocks it holds and import them, compute
 *            the rest, PUT every new block (and the trailing partial one
 *            under a per-job key) with a lease, and answer the first token
 *            with the keys once the PUTs are acknowledged.
 *   decode:  for a JOB_DECODE with keys, GET the blocks while the batch
 *            keeps stepping, then join the request to the batch with the
 *            blocks imported (missing or corrupt ones are recomputed), and
 *            stream tokens back. Without keys it serves the whole request. */
#ifndef TANDEM_NODE_NODE_H
#define TANDEM_NODE_NODE_H

#include "tandem/proto/cluster.pb-c.h"

/* main() of tandem-prefill (role ROLE_PREFILL) and tandem-decode. */
int tdm_node_main(int argc, char **argv, Tandem__Cluster__Role role);

#endif
