/** The environment of a fresh machine for npm: no npm_config_* (nor other npm_*), HOME an empty directory. */
export function freshEnv(home: string): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!/^npm_/i.test(k) && k !== "HOME" && k !== "INIT_CWD") env[k] = v;
  env.HOME = home;
  return env;
}
