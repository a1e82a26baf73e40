/*
 * generate.c: load a nibble model and stream a completion to stdout.
 *
 *   generate MODEL [PROMPT] [MAX_TOKENS] [THREADS]
 *
 * MODEL is a .nib file (memory-mapped) or a Hugging Face folder / GGUF file
 * (converted in memory). Greedy decoding, so the output is reproducible.
 * Timing goes to stderr as "generated N tokens in S s (T tok/s), prompt P
 * tokens in S s", the same quantities `nibble bench` reports.
 * Build: see the Makefile beside this file.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nibble.h"

static bool print_text(uint32_t token, const char *text, size_t len, void *user) {
    (void)token;
    (void)user;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
    return true; /* keep going */
}

static int fail(const char *what, nibble_status st) {
    fprintf(stderr, "generate: %s failed (%s): %s\n", what, nibble_status_string(st),
            nibble_last_error());
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL [PROMPT] [MAX_TOKENS] [THREADS]\n", argv[0]);
        return 2;
    }
    const char *prompt = argc > 2 ? argv[2] : "Once upon a time";
    int max_tokens = argc > 3 ? atoi(argv[3]) : 64;
    int threads = argc > 4 ? atoi(argv[4]) : 0;
    int rc = 1;
    nibble_model *model = NULL;
    nibble_session *session = NULL;
    nibble_sampler *sampler = NULL;
    uint32_t *tokens = NULL;
    nibble_status st;

    if ((st = nibble_model_load(argv[1], NULL, &model)) != NIBBLE_OK) {
        rc = fail("loading the model", st);
        goto done;
    }
    nibble_model_info info;
    if ((st = nibble_model_get_info(model, &info)) != NIBBLE_OK) {
        rc = fail("nibble_model_get_info", st);
        goto done;
    }
    fprintf(stderr, "nibble %s: %s, %s, %u layers, vocab %u, %s kernels\n", nibble_version(),
            info.architecture, info.quantization, info.n_layer, info.n_vocab, info.isa);

    nibble_session_params sp = nibble_session_default_params();
    sp.n_threads = (uint32_t)threads;
    if ((st = nibble_session_new(model, &sp, &session)) != NIBBLE_OK) {
        rc = fail("creating the session", st);
        goto done;
    }
    if ((st = nibble_sampler_new(model, NULL, &sampler)) != NIBBLE_OK) { /* greedy */
        rc = fail("creating the sampler", st);
        goto done;
    }

    /* Ask for the token count first, then tokenize into a buffer that fits. */
    size_t n_tokens = 0;
    st = nibble_tokenize(model, prompt, strlen(prompt), true, NULL, 0, &n_tokens);
    if (st != NIBBLE_OK && st != NIBBLE_ERR_BUFFER_TOO_SMALL) {
        rc = fail("tokenizing the prompt", st);
        goto done;
    }
    tokens = malloc((n_tokens ? n_tokens : 1) * sizeof *tokens);
    if (!tokens) {
        fprintf(stderr, "generate: out of memory\n");
        goto done;
    }
    if ((st = nibble_tokenize(model, prompt, strlen(prompt), true, tokens, n_tokens,
                              &n_tokens)) != NIBBLE_OK) {
        rc = fail("tokenizing the prompt", st);
        goto done;
    }

    nibble_generate_params gp = nibble_generate_default_params();
    gp.max_tokens = (uint32_t)max_tokens;
    nibble_generate_result res;
    fputs(prompt, stdout);
    st = nibble_generate(session, sampler, tokens, n_tokens, &gp, print_text, NULL, &res);
    if (st != NIBBLE_OK) {
        rc = fail("generating", st);
        goto done;
    }
    putchar('\n');
    fprintf(stderr, "generated %u tokens in %.3f s (%.1f tok/s), prompt %u tokens in %.3f s\n",
            res.n_generated_tokens, res.generate_seconds,
            res.generate_seconds > 0 ? res.n_generated_tokens / res.generate_seconds : 0.0,
            res.n_prompt_tokens, res.prompt_seconds);
    rc = 0;
done:
    free(tokens);
    nibble_sampler_free(sampler);
    nibble_session_free(session);
    nibble_model_free(model);
    return rc;
}
