# Builds the native engine (native/) as one node-addon-api module: build/Release/tuneserve_native.node.
# CUDA sources compile only where nvcc is found (scripts/find-cuda.cjs); the CUDA runtime is linked
# statically so the addon loads on machines with no GPU driver and falls back to the CPU backend.
# TUNESERVE_SANITIZE=1 at configure time builds it with AddressSanitizer and UndefinedBehaviorSanitizer
# (-O1 -g, no recovery: the first report aborts). Node itself is not instrumented, so such an addon is
# loaded with LD_PRELOAD=$(gcc -print-file-name=libasan.so) and ASAN_OPTIONS=detect_leaks=0 (Node keeps
# memory until exit by design); test/helpers/sanitizer.ts sets both up.
{
  'variables': {
    'cuda_root': '<!(node scripts/find-cuda.cjs)',
    'has_cuda': '<!(node scripts/find-cuda.cjs has)',
    'sanitize': '<!(node -p "process.env.TUNESERVE_SANITIZE === \'1\' ? 1 : 0")',
  },
  'targets': [{
    'target_name': 'tuneserve_native',
    'sources': [
      '<!@(node scripts/list-sources.cjs)',
    ],
    'include_dirs': [
      "<!(node -p \"require('node-addon-api').include_dir\")",
      'native',
    ],
    'defines': ['NAPI_VERSION=8', 'NAPI_CPP_EXCEPTIONS'],
    'cflags!': ['-fno-exceptions', '-fno-rtti'],
    'cflags_cc!': ['-fno-exceptions', '-fno-rtti'],
    'cflags_cc': ['-std=c++17', '-O3', '-fexceptions', '-frtti', '-fvisibility=hidden', '-Wall', '-Wno-unused-parameter', '-Wno-sign-compare'],
    'libraries': ['-ldl', '-lpthread'],
    'conditions': [
      ['sanitize==1', {
        'cflags_cc!': ['-O3'],
        'cflags_cc+': ['-O1', '-g', '-fno-omit-frame-pointer', '-fsanitize=address,undefined', '-fno-sanitize-recover=all'],
        'ldflags+': ['-fsanitize=address,undefined'],
      }],
      ['has_cuda==1', {
        'sources': ['<!@(node scripts/list-sources.cjs cu)'],
        'defines': ['TUNESERVE_WITH_CUDA=1'],
        'include_dirs': ['<(cuda_root)/include'],
        'libraries': ['<(cuda_root)/lib64/libcudart_static.a', '-lrt'],
        'rules': [{
          'rule_name': 'nvcc',
          'extension': 'cu',
          'inputs': ['<(RULE_INPUT_PATH)'],
          'outputs': ['<(INTERMEDIATE_DIR)/<(RULE_INPUT_ROOT).cu.o'],
          'action': [
            '<(cuda_root)/bin/nvcc', '-c', '<(RULE_INPUT_PATH)', '-o', '<(INTERMEDIATE_DIR)/<(RULE_INPUT_ROOT).cu.o',
            '-O3', '-std=c++17', '-Inative', '-Xcompiler', '-fPIC', '-Xcompiler', '-fvisibility=hidden',
            '-gencode=arch=compute_80,code=sm_80', '-gencode=arch=compute_89,code=sm_89',
            '-gencode=arch=compute_90a,code=sm_90a', '-gencode=arch=compute_90,code=compute_90',
          ],
          'process_outputs_as_sources': 1,
          'message': 'nvcc <(RULE_INPUT_PATH)',
        }],
      }],
    ],
  }],
}
