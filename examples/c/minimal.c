/* minimal.c: the README's example. Usage: minimal MODEL.nib */
#include <stdio.h>
#include "nibble.h"

static bool on_text(uint32_t tok, const char *text, size_t len, void *user) {
    (void)tok; (void)user;
    fwrite(text, 1, len, stdout);
    return true;                                  /* false would stop */
}

int main(int argc, char **argv) {
    nibble_model *m = NULL; nibble_session *s = NULL; nibble_sampler *g = NULL;
    uint32_t ids[64]; size_t n = 0;
    if (argc < 2 || nibble_model_load(argv[1], NULL, &m) != NIBBLE_OK ||
        nibble_session_new(m, NULL, &s) != NIBBLE_OK ||
        nibble_sampler_new(m, NULL, &g) != NIBBLE_OK ||                /* greedy */
        nibble_tokenize(m, "Once upon a time", 16, true, ids, 64, &n) != NIBBLE_OK ||
        nibble_generate(s, g, ids, n, NULL, on_text, NULL, NULL) != NIBBLE_OK)
        fprintf(stderr, "error: %s\n", nibble_last_error());
    nibble_sampler_free(g); nibble_session_free(s); nibble_model_free(m);
    return 0;
}
