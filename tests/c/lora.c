/*
 * lora.c: LoRA adapters hot-swapped on a live session through the C API.
 * Run by tests/capi.rs (also under valgrind):
 *
 *   lora MODEL.nib MAX_ADAPTER TOM_ADAPTER NOT_AN_ADAPTER
 *
 * stories260k tells of "a little girl named Lily"; the adapter "max" (PEFT,
 * r=8, all linear layers) of a dog named Max, "tom" (r=4, q/v) of a cat named
 * Tom. Prints one line per check and "all N checks passed"; exits 1 on the
 * first failed check.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nibble.h"

static int n_checks = 0;

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

/* Greedy story of 24 tokens from BOS on a fresh cache. */
static void story(nibble_session *s, nibble_sampler *g, char *out) {
    out[0] = 0;
    uint32_t bos = 1;
    nibble_generate_params gp = nibble_generate_default_params();
    gp.max_tokens = 24;
    gp.ignore_eos = true;
    if (nibble_session_reset(s) != NIBBLE_OK ||
        nibble_generate(s, g, &bos, 1, &gp, collect, out, NULL) != NIBBLE_OK) {
        fprintf(stderr, "FAILED generate: %s\n", nibble_last_error());
        exit(1);
    }
}

static void expect_story(const char *what, nibble_session *s, nibble_sampler *g, const char *needle) {
    char text[4096];
    story(s, g, text);
    n_checks++;
    if (!strstr(text, needle)) {
        fprintf(stderr, "FAILED %s: want \"%s\" in \"%s\"\n", what, needle, text);
        exit(1);
    }
    printf("ok  %-40s %s\n", what, text);
}

static void expect(const char *what, nibble_status got, nibble_status want, const char *needle) {
    const char *msg = nibble_last_error();
    n_checks++;
    if (got != want || (needle && !strstr(msg, needle))) {
        fprintf(stderr, "FAILED %s: got %d (%s), want %d; message %s (want %s)\n", what, got,
                nibble_status_string(got), want, msg, needle ? needle : "-");
        exit(1);
    }
    printf("ok  %-40s %s\n", what, want == NIBBLE_OK ? "" : msg);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s MODEL.nib MAX_ADAPTER TOM_ADAPTER NOT_AN_ADAPTER\n", argv[0]);
        return 2;
    }
    const char *max = argv[2], *tom = argv[3], *bad = argv[4];
    nibble_model *m = NULL;
    nibble_session *s = NULL;
    nibble_sampler *g = NULL;
    nibble_session_params sp = nibble_session_default_params();
    sp.n_ctx = 64;
    sp.n_threads = 1;
    expect("load", nibble_model_load(argv[1], NULL, &m), NIBBLE_OK, NULL);
    expect("session", nibble_session_new(m, &sp, &s), NIBBLE_OK, NULL);
    expect("sampler", nibble_sampler_new(m, NULL, &g), NIBBLE_OK, NULL);

    expect_story("base", s, g, "little girl named Lily");
    expect("add max", nibble_session_lora_add(s, "max", max, 1.0f), NIBBLE_OK, NULL);
    expect_story("max", s, g, "little dog named Max");
    expect("max scale 0", nibble_session_lora_scale(s, "max", 0.0f), NIBBLE_OK, NULL);
    expect_story("max off", s, g, "little girl named Lily");
    expect("add tom", nibble_session_lora_add(s, "tom", tom, 1.0f), NIBBLE_OK, NULL);
    expect_story("tom", s, g, "little cat named Tom");
    expect("remove tom", nibble_session_lora_remove(s, "tom"), NIBBLE_OK, NULL);
    expect("max scale 1", nibble_session_lora_scale(s, "max", 1.0f), NIBBLE_OK, NULL);
    expect_story("max again", s, g, "little dog named Max");

    expect("add: same name", nibble_session_lora_add(s, "max", tom, 1.0f),
           NIBBLE_ERR_INVALID_ARGUMENT, "already attached");
    expect("add: not an adapter", nibble_session_lora_add(s, "bad", bad, 1.0f),
           NIBBLE_ERR_FORMAT, "no adapter_config.json");
    expect("add: NULL path", nibble_session_lora_add(s, "x", NULL, 1.0f),
           NIBBLE_ERR_INVALID_ARGUMENT, "path");
    expect("scale: unknown", nibble_session_lora_scale(s, "nope", 1.0f),
           NIBBLE_ERR_INVALID_ARGUMENT, "no adapter named 'nope'");
    expect("remove: unknown", nibble_session_lora_remove(s, "tom"),
           NIBBLE_ERR_INVALID_ARGUMENT, "no adapter named 'tom'");
    expect("remove: NULL session", nibble_session_lora_remove(NULL, "max"),
           NIBBLE_ERR_INVALID_ARGUMENT, "session");
    /* Failed calls changed nothing. */
    expect_story("max after errors", s, g, "little dog named Max");

    nibble_sampler_free(g);
    nibble_session_free(s); /* frees the attached adapter */
    nibble_model_free(m);
    printf("all %d checks passed\n", n_checks);
    return 0;
}
