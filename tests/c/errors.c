/*
 * errors.c: every error path of the C API, with its status code and message,
 * plus the documented thread-safety rules. Run by tests/capi.rs (also under
 * valgrind):
 *
 *   errors MODEL.nib CORRUPT.nib MISSING_PATH
 *
 * Prints one line per check and "all N checks passed"; exits 1 on the first
 * failed check.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nibble.h"

static int n_checks = 0;

#define CHECK(cond, ...)                                                        \
    do {                                                                        \
        n_checks++;                                                             \
        if (!(cond)) {                                                          \
            fprintf(stderr, "FAILED %s:%d: %s: ", __FILE__, __LINE__, #cond);   \
            fprintf(stderr, __VA_ARGS__);                                       \
            fprintf(stderr, "\n  last error: %s\n", nibble_last_error());       \
            exit(1);                                                            \
        }                                                                       \
    } while (0)

/* The call returned `want` and the message contains `needle`. */
static void expect(const char *what, nibble_status got, nibble_status want, const char *needle) {
    const char *msg = nibble_last_error();
    n_checks++;
    if (got != want || (needle && !strstr(msg, needle))) {
        fprintf(stderr, "FAILED %s: got %d (%s), want %d (%s); message %s (want it to contain %s)\n",
                what, got, nibble_status_string(got), want, nibble_status_string(want), msg,
                needle ? needle : "-");
        exit(1);
    }
    printf("ok  %-52s %s\n", what, want == NIBBLE_OK ? "" : msg);
}

static bool stop_after_3(uint32_t token, const char *text, size_t len, void *user) {
    (void)token;
    (void)text;
    (void)len;
    int *count = user;
    return ++*count < 3;
}

static bool collect(uint32_t token, const char *text, size_t len, void *user) {
    (void)token;
    char *out = user;
    size_t have = strlen(out);
    if (have + len < 4096) {
        memcpy(out + have, text, len);
        out[have + len] = 0;
    }
    return true;
}

struct worker {
    nibble_model *model;
    char text[4096];
    nibble_status st;
    char thread_error_before[64];
};

/* One session per thread over a shared model: greedy, so both threads must
 * produce the same text. Also checks that the last error is per thread. */
static void *worker_main(void *arg) {
    struct worker *w = arg;
    snprintf(w->thread_error_before, sizeof w->thread_error_before, "%s", nibble_last_error());
    nibble_session *s = NULL;
    nibble_sampler *g = NULL;
    nibble_session_params sp = nibble_session_default_params();
    sp.n_ctx = 128;
    sp.n_threads = 1;
    w->st = nibble_session_new(w->model, &sp, &s);
    if (w->st == NIBBLE_OK) w->st = nibble_sampler_new(w->model, NULL, &g);
    uint32_t bos = 1;
    nibble_generate_params gp = nibble_generate_default_params();
    gp.max_tokens = 40;
    if (w->st == NIBBLE_OK) w->st = nibble_generate(s, g, &bos, 1, &gp, collect, w->text, NULL);
    nibble_sampler_free(g);
    nibble_session_free(s);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL.nib CORRUPT.nib MISSING_PATH\n", argv[0]);
        return 2;
    }
    const char *model_path = argv[1], *corrupt = argv[2], *missing = argv[3];
    nibble_model *m = NULL;
    nibble_session *s = NULL;
    nibble_sampler *g = NULL;

    CHECK(nibble_version()[0] >= '0' && nibble_version()[0] <= '9', "version %s", nibble_version());
    CHECK(strcmp(nibble_last_error(), "") == 0, "no error yet: %s", nibble_last_error());
    CHECK(strcmp(nibble_status_string(NIBBLE_ERR_CONTEXT_OVERFLOW), "context overflow") == 0, "%s",
          nibble_status_string(NIBBLE_ERR_CONTEXT_OVERFLOW));

    /* Loading. */
    expect("load: missing file", nibble_model_load(missing, NULL, &m), NIBBLE_ERR_IO, missing);
    CHECK(m == NULL, "out_model untouched on failure");
    expect("load: corrupt file", nibble_model_load(corrupt, NULL, &m), NIBBLE_ERR_FORMAT, corrupt);
    CHECK(m == NULL, "out_model untouched on failure");
    expect("load: NULL path", nibble_model_load(NULL, NULL, &m), NIBBLE_ERR_INVALID_ARGUMENT,
           "path is NULL");
    expect("load: NULL out_model", nibble_model_load(model_path, NULL, NULL),
           NIBBLE_ERR_INVALID_ARGUMENT, "out_model is NULL");
    nibble_model_params mp = nibble_model_default_params();
    mp.isa = "pentium";
    expect("load: unknown isa", nibble_model_load(model_path, &mp, &m),
           NIBBLE_ERR_INVALID_ARGUMENT, "pentium");
    mp = nibble_model_default_params();
    mp.verify_checksums = true;
    expect("load: valid model, checksums verified", nibble_model_load(model_path, &mp, &m),
           NIBBLE_OK, NULL);
    CHECK(m != NULL, "model handle");

    nibble_model_info info;
    expect("info: NULL model", nibble_model_get_info(NULL, &info), NIBBLE_ERR_INVALID_ARGUMENT,
           "model is NULL");
    expect("info: NULL out_info", nibble_model_get_info(m, NULL), NIBBLE_ERR_INVALID_ARGUMENT,
           "out_info is NULL");
    expect("info", nibble_model_get_info(m, &info), NIBBLE_OK, NULL);
    CHECK(info.n_vocab == 512 && info.n_layer == 5 && info.n_ctx_train == 512 && info.bos_id == 1 &&
              info.eos_id == 2 && info.has_tokenizer,
          "stories260k info: vocab %u layers %u ctx %u bos %d eos %d", info.n_vocab, info.n_layer,
          info.n_ctx_train, info.bos_id, info.eos_id);
    CHECK(strcmp(info.architecture, "llama") == 0, "architecture %s", info.architecture);
    CHECK(strlen(info.quantization) > 0 && strlen(info.isa) > 0, "quantization %s isa %s",
          info.quantization, info.isa);

    /* Tokenizer. */
    const char *text = "Once upon a time";
    uint32_t ids[64];
    size_t n = 0, need = 0;
    expect("tokenize: NULL model", nibble_tokenize(NULL, text, strlen(text), true, ids, 64, &n),
           NIBBLE_ERR_INVALID_ARGUMENT, "model is NULL");
    expect("tokenize: NULL text with a length", nibble_tokenize(m, NULL, 5, true, ids, 64, &n),
           NIBBLE_ERR_INVALID_ARGUMENT, "text is NULL");
    expect("tokenize: invalid UTF-8", nibble_tokenize(m, "\xff\xfe", 2, true, ids, 64, &n),
           NIBBLE_ERR_INVALID_ARGUMENT, "UTF-8");
    expect("tokenize: sizing call (capacity 0)",
           nibble_tokenize(m, text, strlen(text), true, NULL, 0, &need), NIBBLE_ERR_BUFFER_TOO_SMALL,
           "buffer holds 0");
    CHECK(need > 1 && need < 64, "needed %zu tokens", need);
    expect("tokenize: buffer one short",
           nibble_tokenize(m, text, strlen(text), true, ids, need - 1, &n),
           NIBBLE_ERR_BUFFER_TOO_SMALL, NULL);
    CHECK(n == need, "reports the needed count %zu, got %zu", need, n);
    expect("tokenize", nibble_tokenize(m, text, strlen(text), true, ids, 64, &n), NIBBLE_OK, NULL);
    CHECK(n == need && ids[0] == 1, "BOS first, %zu tokens", n);
    char buf[256];
    size_t len = 0;
    expect("detokenize: buffer too small", nibble_detokenize(m, ids, n, true, buf, 4, &len),
           NIBBLE_ERR_BUFFER_TOO_SMALL, "NUL");
    CHECK(len > 4, "needed length %zu", len);
    expect("detokenize: token out of range",
           nibble_detokenize(m, (const uint32_t[]){1, 9999}, 2, true, buf, 256, &len),
           NIBBLE_ERR_INVALID_ARGUMENT, "9999");
    expect("detokenize", nibble_detokenize(m, ids, n, true, buf, sizeof buf, &len), NIBBLE_OK, NULL);
    CHECK(strstr(buf, "Once upon a time") && strlen(buf) == len, "round trip: '%s'", buf);

    /* Sessions. */
    nibble_session_params sp = nibble_session_default_params();
    sp.n_batch = 0;
    expect("session: n_batch 0", nibble_session_new(m, &sp, &s), NIBBLE_ERR_INVALID_ARGUMENT,
           "n_batch");
    CHECK(s == NULL, "out_session untouched on failure");
    expect("session: NULL model", nibble_session_new(NULL, NULL, &s), NIBBLE_ERR_INVALID_ARGUMENT,
           "model is NULL");
    sp = nibble_session_default_params();
    sp.n_ctx = 8;
    sp.n_threads = 1;
    expect("session: 8-token context", nibble_session_new(m, &sp, &s), NIBBLE_OK, NULL);
    const float *logits = NULL;
    size_t n_vocab = 0, n_past = 99, n_ctx = 0;
    expect("logits before any eval", nibble_session_logits(s, &logits, &n_vocab),
           NIBBLE_ERR_INVALID_ARGUMENT, "no logits yet");
    uint32_t nine[9] = {1, 2, 3, 4, 5, 6, 7, 8, 9};
    expect("eval: context overflow", nibble_session_eval(s, nine, 9), NIBBLE_ERR_CONTEXT_OVERFLOW,
           "context of 8 tokens");
    expect("state after the failed eval", nibble_session_state(s, &n_past, &n_ctx), NIBBLE_OK, NULL);
    CHECK(n_past == 0 && n_ctx == 8, "nothing evaluated: n_past %zu n_ctx %zu", n_past, n_ctx);
    expect("eval: token out of range", nibble_session_eval(s, (const uint32_t[]){1, 512}, 2),
           NIBBLE_ERR_INVALID_ARGUMENT, "512");
    expect("eval: NULL session", nibble_session_eval(NULL, nine, 1), NIBBLE_ERR_INVALID_ARGUMENT,
           "session is NULL");
    expect("eval: NULL tokens with a count", nibble_session_eval(s, NULL, 3),
           NIBBLE_ERR_INVALID_ARGUMENT, "tokens is NULL");
    expect("eval: 5 tokens", nibble_session_eval(s, ids, n), NIBBLE_OK, NULL);
    expect("logits", nibble_session_logits(s, &logits, &n_vocab), NIBBLE_OK, NULL);
    CHECK(logits && n_vocab == 512, "logits of %zu", n_vocab);
    expect("eval: overflow after 5 tokens", nibble_session_eval(s, nine, 4),
           NIBBLE_ERR_CONTEXT_OVERFLOW, "9 tokens");
    expect("truncate: past the cache", nibble_session_truncate(s, 6), NIBBLE_ERR_INVALID_ARGUMENT,
           "holds 5");
    expect("truncate to 2", nibble_session_truncate(s, 2), NIBBLE_OK, NULL);
    nibble_session_state(s, &n_past, NULL);
    CHECK(n_past == 2, "n_past %zu after truncate", n_past);
    expect("reset", nibble_session_reset(s), NIBBLE_OK, NULL);
    nibble_session_state(s, &n_past, NULL);
    CHECK(n_past == 0, "n_past %zu after reset", n_past);

    /* Sampler. */
    nibble_sampler_params smp = nibble_sampler_default_params();
    smp.top_p = 2.0f;
    expect("sampler: top_p 2", nibble_sampler_new(m, &smp, &g), NIBBLE_ERR_INVALID_ARGUMENT, "top_p");
    smp = nibble_sampler_default_params();
    smp.temperature = -1.0f;
    expect("sampler: negative temperature", nibble_sampler_new(m, &smp, &g),
           NIBBLE_ERR_INVALID_ARGUMENT, "temperature");
    CHECK(g == NULL, "out_sampler untouched on failure");
    smp = nibble_sampler_default_params();
    smp.temperature = 0.8f;
    smp.seed = 42;
    smp.repeat_penalty = 1.1f;
    expect("sampler: temperature 0.8", nibble_sampler_new(m, &smp, &g), NIBBLE_OK, NULL);
    uint32_t tok = 0;
    expect("sample before any eval", nibble_sampler_sample(g, s, &tok),
           NIBBLE_ERR_INVALID_ARGUMENT, "no logits yet");
    nibble_session_eval(s, ids, n);
    expect("sample", nibble_sampler_sample(g, s, &tok), NIBBLE_OK, NULL);
    CHECK(tok < 512, "token %u", tok);
    nibble_session_reset(s);

    /* Generation. */
    int count = 0;
    nibble_generate_result res;
    nibble_generate_params gp = nibble_generate_default_params();
    gp.max_tokens = 100;
    expect("generate: callback stops after 3",
           nibble_generate(s, g, ids, 2, &gp, stop_after_3, &count, &res), NIBBLE_OK, NULL);
    CHECK(count == 3 && res.n_generated_tokens == 3 && res.stop_reason == NIBBLE_STOP_CALLBACK,
          "count %d generated %u stop %d", count, res.n_generated_tokens, res.stop_reason);
    nibble_session_reset(s);
    gp.ignore_eos = true;
    expect("generate: until the context is full",
           nibble_generate(s, g, ids, n, &gp, NULL, NULL, &res), NIBBLE_OK, NULL);
    CHECK(res.stop_reason == NIBBLE_STOP_CONTEXT_FULL && res.n_prompt_tokens == n,
          "stop %d after %u tokens", res.stop_reason, res.n_generated_tokens);
    nibble_session_reset(s);
    expect("generate: prompt longer than the context",
           nibble_generate(s, g, nine, 9, NULL, NULL, NULL, NULL), NIBBLE_ERR_CONTEXT_OVERFLOW,
           "context of 8 tokens");
    const char *stops[] = {"park", ""};
    gp.stop_strings = stops;
    gp.n_stop_strings = 2;
    expect("generate: empty stop string", nibble_generate(s, g, ids, n, &gp, NULL, NULL, NULL),
           NIBBLE_ERR_INVALID_ARGUMENT, "stop_strings[1] is empty");
    gp.stop_strings = NULL;
    expect("generate: NULL stop_strings with a count",
           nibble_generate(s, g, ids, n, &gp, NULL, NULL, NULL), NIBBLE_ERR_INVALID_ARGUMENT,
           "stop_strings is NULL");
    expect("generate: NULL sampler", nibble_generate(s, NULL, ids, n, NULL, NULL, NULL, NULL),
           NIBBLE_ERR_INVALID_ARGUMENT, "sampler is NULL");
    expect("generate: empty prompt and empty cache",
           nibble_generate(s, g, NULL, 0, NULL, NULL, NULL, NULL), NIBBLE_ERR_INVALID_ARGUMENT,
           "empty prompt");

    /* A model shared by sessions on two threads; the model handle freed
     * while they run (the sessions keep the weights alive). */
    struct worker w[2];
    memset(w, 0, sizeof w);
    pthread_t th[2];
    for (int i = 0; i < 2; i++) {
        w[i].model = m;
        CHECK(pthread_create(&th[i], NULL, worker_main, &w[i]) == 0, "pthread_create");
    }
    for (int i = 0; i < 2; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < 2; i++) {
        CHECK(w[i].st == NIBBLE_OK, "thread %d status %d", i, w[i].st);
        CHECK(strcmp(w[i].thread_error_before, "") == 0, "last error is per thread, got '%s'",
              w[i].thread_error_before);
    }
    CHECK(strcmp(w[0].text, w[1].text) == 0 && strstr(w[0].text, "Lily"),
          "same greedy story on both threads: '%s' vs '%s'", w[0].text, w[1].text);
    printf("ok  %-52s\n", "two threads, one model, same greedy story");
    CHECK(strstr(nibble_last_error(), "empty prompt"), "this thread's error kept");

    nibble_model_free(m); /* s still holds the weights */
    m = NULL;
    expect("session outlives its model handle", nibble_session_eval(s, ids, n), NIBBLE_OK, NULL);

    nibble_sampler_free(g);
    nibble_session_free(s);
    nibble_model_free(NULL);
    nibble_session_free(NULL);
    nibble_sampler_free(NULL);
    printf("all %d checks passed\n", n_checks);
    return 0;
}
